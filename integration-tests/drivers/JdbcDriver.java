// pgjdbc with server-side prepared statements from the first execution (prepareThreshold=1),
// transactions and a batch of updates, through pgbastion: 8 concurrent clients, with the proxy's
// settings in the environment (PGB_PORT, PGB_USER, PGB_TOKEN, PGB_CA). Prints the upstream
// backend pids seen, then "ok". Run as a single-file program: java JdbcDriver.java
import java.sql.Connection;
import java.sql.DriverManager;
import java.sql.PreparedStatement;
import java.sql.ResultSet;
import java.util.ArrayList;
import java.util.List;
import java.util.Set;
import java.util.TreeSet;
import java.util.concurrent.ConcurrentSkipListSet;
import java.util.concurrent.ExecutorService;
import java.util.concurrent.Executors;
import java.util.concurrent.Future;

public class JdbcDriver {
    static final int CLIENTS = 8;
    static final int ROUNDS = 30;

    public static void main(String[] args) throws Exception {
        String url = "jdbc:postgresql://127.0.0.1:" + System.getenv("PGB_PORT")
            + "/demo?sslmode=verify-full&prepareThreshold=1&sslrootcert=" + System.getenv("PGB_CA");
        String user = System.getenv("PGB_USER");
        String token = System.getenv("PGB_TOKEN");
        Set<Integer> pids = new ConcurrentSkipListSet<>();
        ExecutorService pool = Executors.newFixedThreadPool(CLIENTS);
        List<Future<String>> results = new ArrayList<>();
        for (int c = 0; c < CLIENTS; c++) {
            final int i = c;
            results.add(pool.submit(() -> {
                try (Connection conn = DriverManager.getConnection(url, user, token)) {
                    for (int j = 0; j < ROUNDS; j++) {
                        // pgjdbc names statements S_1, S_2, ... in every connection; each
                        // client's own text shows an answer from another's as a wrong number.
                        try (PreparedStatement p = conn.prepareStatement(
                                "SELECT " + i + " AS client, ?::int * 10 + ?::int, pg_backend_pid()")) {
                            p.setInt(1, i);
                            p.setInt(2, j);
                            try (ResultSet r = p.executeQuery()) {
                                r.next();
                                if (r.getInt(1) != i || r.getInt(2) != i * 10 + j) {
                                    return "client " + i + ": got " + r.getInt(1) + ", " + r.getInt(2);
                                }
                                pids.add(r.getInt(3));
                            }
                        }
                        conn.setAutoCommit(false);
                        try (PreparedStatement p = conn.prepareStatement(
                                "SELECT count(*) FROM orders WHERE id > ?")) {
                            p.setInt(1, 0);
                            try (ResultSet r = p.executeQuery()) {
                                r.next();
                            }
                        }
                        // A batch: pipelined Bind/Execute of one prepared statement.
                        try (PreparedStatement p = conn.prepareStatement(
                                "UPDATE orders SET amount = amount WHERE id = ?")) {
                            for (int id = 1; id <= 3; id++) {
                                p.setInt(1, id);
                                p.addBatch();
                            }
                            int[] counts = p.executeBatch();
                            if (counts.length != 3 || counts[0] != 1) {
                                return "client " + i + ": batch counts " + java.util.Arrays.toString(counts);
                            }
                        }
                        conn.commit();
                        conn.setAutoCommit(true);
                    }
                    return "ok";
                } catch (Exception e) {
                    return "client " + i + ": " + e;
                }
            }));
        }
        Set<String> outcomes = new TreeSet<>();
        for (Future<String> result : results) {
            outcomes.add(result.get());
        }
        pool.shutdown();
        if (!outcomes.equals(Set.of("ok"))) {
            System.err.println(outcomes);
            System.exit(1);
        }
        StringBuilder line = new StringBuilder("pids pgjdbc");
        for (int pid : pids) {
            line.append(' ').append(pid);
        }
        System.out.println(line);
        System.out.println("ok");
    }
}
