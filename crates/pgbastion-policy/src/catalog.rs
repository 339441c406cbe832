//! What the upstream catalog says about relations, as far as policies need it: which relations
//! exist (to resolve unqualified names as PostgreSQL will), what each view reads (a view is
//! the relations it reads), and the inheritance and partition tree (a parent's rows are its
//! children's). The proxy loads it from the upstream with schema-qualified queries; here it is
//! plain data, so deciding stays pure.

use std::collections::{BTreeSet, HashMap, HashSet};

/// One row of catalog facts, relations named `schema.name`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fact {
    /// A relation exists.
    Relation(String),
    /// A view's definition reads `column` of `base`; None: the whole row, or no column at all
    /// (PostgreSQL records both the same way, so both count as every column).
    ViewReads {
        view: String,
        base: String,
        column: Option<String>,
    },
    /// `child` inherits from, or is a partition of, `parent`.
    Inherits { parent: String, child: String },
    /// ALTER ROLE/DATABASE ... SET search_path for this database: sessions of `role` (None:
    /// every role) start with `path`.
    DefaultPath { role: Option<String>, path: String },
}

impl Fact {
    /// One row of `Catalog::QUERY`'s result.
    pub fn from_row(row: &[Option<String>]) -> Option<Fact> {
        let [kind, a, b, c, d, column] = row else {
            return None;
        };
        let qualified = |schema: &Option<String>, name: &Option<String>| {
            Some(format!("{}.{}", schema.as_deref()?, name.as_deref()?))
        };
        match kind.as_deref()? {
            "r" => Some(Fact::Relation(qualified(a, b)?)),
            "v" => Some(Fact::ViewReads {
                view: qualified(a, b)?,
                base: qualified(c, d)?,
                column: column.clone(),
            }),
            "i" => Some(Fact::Inherits {
                parent: qualified(a, b)?,
                child: qualified(c, d)?,
            }),
            "s" => Some(Fact::DefaultPath {
                role: a.clone(),
                path: column.clone()?,
            }),
            _ => None,
        }
    }
}

/// Columns a relation is read through: None for every column.
pub type Columns = Option<BTreeSet<String>>;

/// A relation reached from another one, and how.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reached {
    pub relation: String,
    /// "view public.v", "partition parent public.events", ... for messages.
    pub via: String,
    /// Reached through a view's definition (else through inheritance).
    pub by_view: bool,
    /// For relations reached through views: the columns read.
    pub columns: Columns,
}

#[derive(Debug, Default, Clone)]
pub struct Catalog {
    /// Distinguishes snapshots, e.g. in decision cache keys; unique per load.
    pub version: u64,
    relations: HashSet<String>,
    views: HashMap<String, Vec<(String, Option<String>)>>,
    children: HashMap<String, Vec<String>>,
    parents: HashMap<String, Vec<String>>,
    /// Schemas of search_path defaults (ALTER ROLE/DATABASE ... SET), by role (None: all).
    default_paths: Vec<(Option<String>, Vec<String>)>,
}

impl Catalog {
    /// Every fact in one schema-qualified query, rows of six text columns: a kind letter,
    /// then schema and name pairs (and a column). Read by `Fact::from_row`.
    pub const QUERY: &str = "\
SELECT 'r', n.nspname::text, c.relname::text, NULL::text, NULL::text, NULL::text
  FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
 WHERE c.relkind IN ('r', 'v', 'm', 'p', 'f', 'S')
   AND n.nspname <> 'pg_toast' AND n.nspname NOT LIKE 'pg\\_temp\\_%' AND n.nspname NOT LIKE 'pg\\_toast\\_temp\\_%'
UNION ALL
-- A whole-row reference (to_jsonb(c), SELECT c) records no column dependency: such a view
-- reads every column of every relation it depends on (NULL column).
SELECT DISTINCT 'v', vn.nspname::text, v.relname::text, bn.nspname::text, b.relname::text,
       CASE WHEN r.ev_action::text LIKE '%:varattno 0 %' THEN NULL ELSE a.attname::text END
  FROM pg_catalog.pg_rewrite r
  JOIN pg_catalog.pg_class v ON v.oid = r.ev_class
  JOIN pg_catalog.pg_namespace vn ON vn.oid = v.relnamespace
  JOIN pg_catalog.pg_depend d ON d.classid = 'pg_catalog.pg_rewrite'::pg_catalog.regclass
       AND d.objid = r.oid AND d.refclassid = 'pg_catalog.pg_class'::pg_catalog.regclass
       AND d.refobjid <> v.oid
  JOIN pg_catalog.pg_class b ON b.oid = d.refobjid
  JOIN pg_catalog.pg_namespace bn ON bn.oid = b.relnamespace
  LEFT JOIN pg_catalog.pg_attribute a ON a.attrelid = b.oid AND a.attnum = d.refobjsubid
       AND d.refobjsubid > 0
 WHERE v.relkind IN ('v', 'm') AND vn.nspname NOT IN ('pg_catalog', 'information_schema')
UNION ALL
SELECT 'i', pn.nspname::text, p.relname::text, cn.nspname::text, c.relname::text, NULL::text
  FROM pg_catalog.pg_inherits i
  JOIN pg_catalog.pg_class c ON c.oid = i.inhrelid
  JOIN pg_catalog.pg_namespace cn ON cn.oid = c.relnamespace
  JOIN pg_catalog.pg_class p ON p.oid = i.inhparent
  JOIN pg_catalog.pg_namespace pn ON pn.oid = p.relnamespace
 WHERE c.relkind IN ('r', 'p', 'f')
UNION ALL
-- search_path defaults set with ALTER ROLE/DATABASE: a session starts with them.
SELECT 's', r.rolname::text, NULL::text, NULL::text, NULL::text, pg_catalog.substr(c.setting, 13)
  FROM pg_catalog.pg_db_role_setting s
  LEFT JOIN pg_catalog.pg_roles r ON r.oid = s.setrole
  CROSS JOIN LATERAL pg_catalog.unnest(s.setconfig) AS c(setting)
 WHERE s.setdatabase IN (0, (SELECT oid FROM pg_catalog.pg_database
                              WHERE datname = pg_catalog.current_database()))
   AND pg_catalog.lower(c.setting) LIKE 'search\\_path=%'";

    pub fn new(version: u64, facts: impl IntoIterator<Item = Fact>) -> Catalog {
        let mut catalog = Catalog {
            version,
            ..Catalog::default()
        };
        for fact in facts {
            match fact {
                Fact::Relation(name) => {
                    catalog.relations.insert(name);
                }
                Fact::ViewReads { view, base, column } => {
                    catalog.views.entry(view).or_default().push((base, column))
                }
                Fact::Inherits { parent, child } => {
                    catalog
                        .children
                        .entry(parent.clone())
                        .or_default()
                        .push(child.clone());
                    catalog.parents.entry(child).or_default().push(parent);
                }
                Fact::DefaultPath { role, path } => {
                    let schemas = crate::analyze::path_from_string(&path);
                    catalog.default_paths.push((role, schemas));
                }
            }
        }
        catalog
    }

    /// Schemas a session of `role` may start with in its search_path (`$user` as written).
    pub fn default_search_path<'a>(
        &'a self,
        role: &'a str,
    ) -> impl Iterator<Item = &'a String> + 'a {
        self.default_paths
            .iter()
            .filter(move |(r, _)| r.as_deref().is_none_or(|r| r == role))
            .flat_map(|(_, schemas)| schemas)
    }

    pub fn contains(&self, relation: &str) -> bool {
        self.relations.contains(relation)
    }

    pub fn len(&self) -> usize {
        self.relations.len()
    }

    pub fn is_empty(&self) -> bool {
        self.relations.is_empty()
    }

    /// Every relation whose rows reading (or writing) `relation` touches besides itself:
    /// what views read, recursively; inheritance and partition children, recursively; and
    /// ancestors, whose rows a child's are. Cycles cannot occur in PostgreSQL's catalog, and
    /// are cut here anyway.
    pub fn reaches(&self, relation: &str) -> Vec<Reached> {
        let mut walk = Walk {
            origin: relation,
            out: Vec::new(),
            // A relation is expanded once per direction it is reached in: reached upward
            // first (from a child) it must still be expanded downward if a view reaches it.
            seen: HashSet::from([(relation.to_string(), Direction::Any)]),
            queue: vec![(relation.to_string(), Direction::Any)],
        };
        while let Some((current, direction)) = walk.queue.pop() {
            if let (Direction::Any, Some(reads)) = (direction, self.views.get(&current)) {
                let mut by_base: HashMap<&str, Columns> = HashMap::new();
                for (base, column) in reads {
                    let entry = by_base
                        .entry(base.as_str())
                        .or_insert_with(|| Some(BTreeSet::new()));
                    match (entry.as_mut(), column) {
                        (Some(columns), Some(column)) => {
                            columns.insert(column.clone());
                        }
                        _ => *entry = None,
                    }
                }
                let mut by_base: Vec<(&str, Columns)> = by_base.into_iter().collect();
                by_base.sort();
                for (base, columns) in by_base {
                    walk.reach(base, format!("view {current}"), columns, Direction::Any);
                }
            }
            // Down the tree from a parent, up it from a child, never sideways to siblings.
            if direction != Direction::Up {
                for child in self.children.get(&current).into_iter().flatten() {
                    let via = format!("parent table {current}");
                    walk.reach(child, via, None, Direction::Down);
                }
            }
            if direction != Direction::Down {
                for parent in self.parents.get(&current).into_iter().flatten() {
                    let via = format!("child table {current}");
                    walk.reach(parent, via, None, Direction::Up);
                }
            }
        }
        walk.out
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Direction {
    Any,
    Up,
    Down,
}

/// The state of one `reaches` traversal.
struct Walk<'a> {
    origin: &'a str,
    out: Vec<Reached>,
    seen: HashSet<(String, Direction)>,
    queue: Vec<(String, Direction)>,
}

impl Walk<'_> {
    fn reach(&mut self, relation: &str, via: String, columns: Columns, direction: Direction) {
        let expanded = self.seen.contains(&(relation.to_string(), Direction::Any))
            || !self.seen.insert((relation.to_string(), direction));
        if !expanded {
            self.queue.push((relation.to_string(), direction));
        }
        if let Some(earlier) = self.out.iter_mut().find(|r| r.relation == relation) {
            // Reached again by another path: it is read through the union of both.
            match (&mut earlier.columns, columns) {
                (Some(all), Some(more)) => all.extend(more),
                (all, _) => *all = None,
            }
        } else if relation != self.origin {
            self.out.push(Reached {
                relation: relation.to_string(),
                by_view: via.starts_with("view "),
                via,
                columns,
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn catalog() -> Catalog {
        let view = |view: &str, base: &str, column: Option<&str>| Fact::ViewReads {
            view: view.into(),
            base: base.into(),
            column: column.map(Into::into),
        };
        Catalog::new(
            1,
            [
                Fact::Relation("public.customers".into()),
                Fact::Relation("public.names".into()),
                Fact::Relation("public.names2".into()),
                view("public.names", "public.customers", Some("name")),
                view("public.names", "public.customers", Some("id")),
                view("public.names2", "public.names", Some("name")),
                view("public.rows", "public.customers", None),
                Fact::Inherits {
                    parent: "public.events".into(),
                    child: "public.events_2026".into(),
                },
                Fact::Inherits {
                    parent: "public.events".into(),
                    child: "public.events_2025".into(),
                },
                Fact::Inherits {
                    parent: "public.events_2026".into(),
                    child: "public.events_2026_11".into(),
                },
            ],
        )
    }

    #[test]
    fn views_reach_what_they_read_with_columns_recursively() {
        let reached = catalog().reaches("public.names2");
        assert_eq!(reached.len(), 2);
        assert_eq!(reached[0].relation, "public.names");
        assert_eq!(reached[1].relation, "public.customers");
        assert_eq!(reached[1].via, "view public.names");
        assert_eq!(
            reached[1].columns,
            Some(BTreeSet::from(["id".to_string(), "name".to_string()]))
        );
        assert_eq!(catalog().reaches("public.rows")[0].columns, None);
    }

    #[test]
    fn a_parent_reached_from_a_child_first_is_still_expanded_downward_from_a_view() {
        let view = |base: &str| Fact::ViewReads {
            view: "public.v".into(),
            base: base.into(),
            column: None,
        };
        let inherits = |child: &str| Fact::Inherits {
            parent: "public.p".into(),
            child: child.into(),
        };
        let catalog = Catalog::new(
            1,
            [
                view("public.z_child"),
                view("public.a_view"),
                Fact::ViewReads {
                    view: "public.a_view".into(),
                    base: "public.p".into(),
                    column: None,
                },
                inherits("public.z_child"),
                inherits("public.p_2025"),
            ],
        );
        let reached: Vec<String> = catalog
            .reaches("public.v")
            .into_iter()
            .map(|r| r.relation)
            .collect();
        assert!(
            reached.contains(&"public.p_2025".to_string()),
            "{reached:?}"
        );
    }

    #[test]
    fn tables_reach_their_whole_inheritance_tree() {
        let mut reached: Vec<String> = catalog()
            .reaches("public.events_2026")
            .into_iter()
            .map(|r| r.relation)
            .collect();
        reached.sort();
        assert_eq!(reached, ["public.events", "public.events_2026_11"]);
        assert_eq!(catalog().reaches("public.events").len(), 3);
        assert!(catalog().reaches("public.customers").is_empty());
    }
}
