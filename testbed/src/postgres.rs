use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::components::Components;
use crate::error::{Context, Result};
use crate::process::{self, Restartable, RunAs, Spec, Stop, Supervised};

const USER: &str = "postgres";
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// A private PostgreSQL cluster: `initdb` in a temp dir, `wal_level=logical`,
/// listening on 127.0.0.1 at a free port with password (SCRAM) auth over TCP.
///
/// The superuser is `postgres`. Each test should work in its own database
/// ([`Postgres::create_database`] with a [`crate::unique_name`]).
pub struct Postgres {
    // Declared before `dir` so that on drop the server is stopped before its
    // directory goes away.
    server: Restartable,
    host: String,
    port: u16,
    password: String,
    bin_dir: PathBuf,
    data_dir: PathBuf,
    log: PathBuf,
    run_as: Option<RunAs>,
    dir: tempfile::TempDir,
}

impl Postgres {
    pub async fn start(c: &Components) -> Result<Self> {
        Self::start_on(c, Ipv4Addr::LOCALHOST, None).await
    }

    /// Listens on `addr` instead of loopback, and also accepts clients from `clients`
    /// (a CIDR such as a cluster's pod subnet).
    pub async fn start_on(c: &Components, addr: Ipv4Addr, clients: Option<&str>) -> Result<Self> {
        let run_as = RunAs::unprivileged(USER)?;
        let dir = process::server_dir("pg")?;
        let root = dir.path();
        if let Some(u) = run_as {
            u.chown(root)?;
        }
        let data_dir = root.join("data");
        let log = root.join("postgres.log");
        let password = process::random_string(24);
        let pwfile = root.join("pwfile");
        std::fs::write(&pwfile, &password).context(|| format!("writing {}", pwfile.display()))?;
        if let Some(u) = run_as {
            u.chown(&pwfile)?;
        }

        let mut initdb = Command::new(c.pg_bin.join("initdb"));
        initdb
            .current_dir(root)
            .arg("--pgdata")
            .arg(&data_dir)
            .args(["--username", USER, "--auth-local=trust", "--auth-host=scram-sha-256"])
            .arg("--pwfile")
            .arg(&pwfile)
            // C locale: no dependency on which locales the machine generated.
            .args(["--encoding=UTF8", "--locale=C", "--no-sync", "--no-instructions"]);
        if let Some(u) = run_as {
            use std::os::unix::process::CommandExt;
            initdb.uid(u.uid).gid(u.gid);
        }
        process::run_logged("initdb", initdb, &log).await?;
        std::fs::remove_file(&pwfile).context(|| format!("removing {}", pwfile.display()))?;

        let port = process::free_port()?;
        let conf = format!(
            "\n# Added by the test bed.\n\
             listen_addresses = '{addr}'\n\
             port = {port}\n\
             unix_socket_directories = '{sockets}'\n\
             wal_level = logical\n\
             max_replication_slots = 20\n\
             max_wal_senders = 20\n\
             max_connections = 200\n\
             # Speed over durability: the tests check that the relay survives its own\n\
             # crashes and PostgreSQL restarts, never that PostgreSQL survives a power cut.\n\
             # synchronous_commit stays on: logical decoding only sends flushed WAL, so\n\
             # asynchronous commits would add up to a WAL-writer cycle of latency to\n\
             # every change, and with fsync off a commit's flush costs nothing anyway.\n\
             fsync = off\n\
             full_page_writes = off\n\
             log_min_messages = warning\n",
            sockets = root.display(),
        );
        append(&data_dir.join("postgresql.conf"), &conf)?;
        let mut hba = String::from(
            "# Written by the test bed: trust on the private socket, passwords over TCP.\n\
             local all all trust\n\
             local replication all trust\n\
             host all all 127.0.0.1/32 scram-sha-256\n\
             host all all ::1/128 scram-sha-256\n\
             host replication all 127.0.0.1/32 scram-sha-256\n\
             host replication all ::1/128 scram-sha-256\n",
        );
        for net in [Some(format!("{addr}/32")), clients.map(str::to_string)]
            .into_iter()
            .flatten()
        {
            hba.push_str(&format!(
                "host all all {net} scram-sha-256\nhost replication all {net} scram-sha-256\n"
            ));
        }
        let hba_path = data_dir.join("pg_hba.conf");
        std::fs::write(&hba_path, &hba).context(|| format!("writing {}", hba_path.display()))?;

        let pg = Self {
            server: Restartable::new("postgres"),
            host: addr.to_string(),
            port,
            password,
            bin_dir: c.pg_bin.clone(),
            data_dir,
            log,
            run_as,
            dir,
        };
        pg.launch().await?;
        Ok(pg)
    }

    async fn launch(&self) -> Result<()> {
        let mut server = Supervised::spawn(Spec {
            name: "postgres",
            program: &self.bin_dir.join("postgres"),
            args: vec!["-D".into(), self.data_dir.clone().into()],
            // SIGINT is PostgreSQL's "fast" shutdown, what `pg_ctl stop -m fast` sends:
            // it disconnects clients (incl. replication) and checkpoints.
            stop_signal: "INT",
            // Immediate shutdown: no checkpoint, crash recovery on the next start.
            kill_signal: "QUIT",
            grace_secs: 10,
            log: &self.log,
            cleanup_dir: self.dir.path(),
            run_as: self.run_as,
            env: Vec::new(),
        })?;
        let conn = self.conn_string("postgres");
        process::wait_ready(&mut server, START_TIMEOUT, || {
            let conn = conn.clone();
            async move {
                let (client, connection) = tokio_postgres::connect(&conn, tokio_postgres::NoTls)
                    .await
                    .map_err(|e| e.to_string())?;
                let conn_task = tokio::spawn(connection);
                let r = client.simple_query("SELECT 1").await.map_err(|e| e.to_string());
                drop(client);
                let _ = conn_task.await;
                r.map(|_| ())
            }
        })
        .await?;
        self.server.set(server);
        Ok(())
    }

    pub fn host(&self) -> &str {
        &self.host
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn user(&self) -> &str {
        USER
    }

    pub fn password(&self) -> &str {
        &self.password
    }

    /// A key=value connection string for `tokio_postgres::connect` (and libpq tools).
    pub fn conn_string(&self, db: &str) -> String {
        format!(
            "host={} port={} user={USER} password={} dbname={db}",
            self.host(),
            self.port,
            self.password
        )
    }

    /// The same as a `postgres://` URL.
    pub fn url(&self, db: &str) -> String {
        format!("postgres://{USER}:{}@{}:{}/{db}", self.password, self.host(), self.port)
    }

    /// The PostgreSQL bin dir, e.g. for `pg_recvlogical` or `psql`.
    pub fn bin_dir(&self) -> &Path {
        &self.bin_dir
    }

    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// The server log (kept only while the server's temp dir exists).
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// Creates a database (the name is quoted, so `unique_name` output works as is).
    pub async fn create_database(&self, name: &str) -> Result<()> {
        let client = self.client("postgres").await?;
        let quoted = name.replace('"', "\"\"");
        client
            .batch_execute(&format!("CREATE DATABASE \"{quoted}\""))
            .await
            .context(|| format!("creating database {name}"))
    }

    /// A new client on the caller's tokio runtime; its connection task is spawned
    /// there, so the client is only usable within that runtime.
    pub async fn client(&self, db: &str) -> Result<tokio_postgres::Client> {
        let (client, connection) = tokio_postgres::connect(&self.conn_string(db), tokio_postgres::NoTls)
            .await
            .context(|| format!("connecting to database {db} on {}:{}", self.host, self.port))?;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "test bed postgres connection ended");
            }
        });
        Ok(client)
    }

    /// Fast shutdown (as `pg_ctl stop -m fast`); data and port are kept for
    /// [`Postgres::start_again`]. Only for a private instance, never the shared one.
    pub async fn stop(&self) -> Result<()> {
        self.halt(Stop::Graceful).await
    }

    /// Immediate shutdown (as `pg_ctl stop -m immediate`): a crash as far as clients
    /// and the WAL are concerned; the next start runs crash recovery.
    pub async fn kill(&self) -> Result<()> {
        self.halt(Stop::Kill).await
    }

    async fn halt(&self, how: Stop) -> Result<()> {
        self.server.halt(how).await
    }

    /// Starts the server again on the same data dir and port.
    pub async fn start_again(&self) -> Result<()> {
        self.server.ensure_stopped()?;
        self.launch().await
    }

    /// A private server whose `wal_level` is `level` (e.g. `replica`: no logical
    /// decoding), for tests of what a relay does on such a server. The setting
    /// needs a restart, so it cannot be changed on a shared server.
    pub async fn with_wal_level(c: &Components, level: &str) -> Result<Self> {
        let pg = Self::start(c).await?;
        let admin = pg.client("postgres").await?;
        admin
            .batch_execute(&format!("ALTER SYSTEM SET wal_level = {level}"))
            .await
            .context(|| format!("setting wal_level = {level}"))?;
        drop(admin);
        pg.stop().await?;
        pg.start_again().await?;
        Ok(pg)
    }
}

fn append(path: &Path, text: &str) -> Result<()> {
    use std::io::Write;
    std::fs::OpenOptions::new()
        .append(true)
        .open(path)
        .and_then(|mut f| f.write_all(text.as_bytes()))
        .context(|| format!("appending to {}", path.display()))
}
