//! Finds the line of a key path ("issuers[1].audiences") in the TOML text, for error messages.

use std::ops::Range;
use toml_edit::{Document, Item, Table, TableLike, Value};

pub fn line_of_offset(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())].matches('\n').count() + 1
}

/// The 1-based line of the deepest key of `path` present in the text.
pub fn line_of_path(text: &str, path: &str) -> Option<usize> {
    let doc = Document::parse(text).ok()?;
    let segments = split_path(path);
    let mut best = None;
    walk(Node::Table(doc.as_table()), &segments, &mut best);
    best.map(|span| line_of_offset(text, span.start))
}

enum Segment<'a> {
    Key(&'a str),
    Index(usize),
}

fn split_path(path: &str) -> Vec<Segment<'_>> {
    let mut segments = Vec::new();
    for part in path.split('.').filter(|p| !p.is_empty()) {
        let mut pieces = part.split('[');
        if let Some(key) = pieces.next().filter(|k| !k.is_empty()) {
            segments.push(Segment::Key(key));
        }
        for index in pieces {
            if let Ok(i) = index.trim_end_matches(']').parse() {
                segments.push(Segment::Index(i));
            }
        }
    }
    segments
}

#[derive(Clone, Copy)]
enum Node<'a> {
    Item(&'a Item),
    Table(&'a Table),
    Value(&'a Value),
}

fn walk(node: Node<'_>, segments: &[Segment<'_>], best: &mut Option<Range<usize>>) {
    let Some((first, rest)) = segments.split_first() else {
        return;
    };
    let next = match (first, node) {
        (Segment::Key(key), node) => {
            let table: Option<&dyn TableLike> = match node {
                Node::Item(item) => item.as_table_like(),
                Node::Table(table) => Some(table),
                Node::Value(value) => value.as_inline_table().map(|t| t as &dyn TableLike),
            };
            table.and_then(|t| t.get_key_value(key)).map(|(key, item)| {
                *best = key.span().or_else(|| item.span()).or(best.take());
                Node::Item(item)
            })
        }
        (Segment::Index(i), Node::Item(Item::ArrayOfTables(array))) => array.get(*i).map(|t| {
            *best = t.span().or(best.take());
            Node::Table(t)
        }),
        (Segment::Index(i), Node::Item(Item::Value(Value::Array(array))))
        | (Segment::Index(i), Node::Value(Value::Array(array))) => array.get(*i).map(|v| {
            *best = v.span().or(best.take());
            Node::Value(v)
        }),
        _ => None,
    };
    if let Some(next) = next {
        walk(next, rest, best);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_paths_resolve_to_their_lines() {
        let text = "[listen]\naddress = \"x\"\n\n[[issuers]]\nissuer = \"a\"\n\n[[issuers]]\nissuer = \"b\"\naudiences = []\n";
        assert_eq!(line_of_path(text, "listen.address"), Some(2));
        assert_eq!(line_of_path(text, "issuers[1].audiences"), Some(9));
        assert_eq!(line_of_path(text, "issuers[0].issuer"), Some(5));
        assert_eq!(line_of_path(text, "issuers[1].missing"), Some(7));
    }
}
