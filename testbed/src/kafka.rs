use std::ffi::OsString;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};

use crate::components::Components;
use crate::error::{Context, Result, TestbedError};
use crate::process::{self, Restartable, Spec, Stop, Supervised};

const START_TIMEOUT: Duration = Duration::from_secs(120);
const TOPIC_TIMEOUT: Duration = Duration::from_secs(30);

/// A single-node Kafka in KRaft mode (`process.roles=broker,controller`), with a
/// PLAINTEXT listener on 127.0.0.1 and every replication factor at 1.
///
/// Topics are not auto-created: tests create theirs with [`Kafka::create_topic`], so
/// a typo in a topic name fails instead of silently producing elsewhere.
pub struct Kafka {
    // Declared before `dir` so that on drop the broker stops before its files go.
    server: Restartable,
    host: Ipv4Addr,
    port: u16,
    java: PathBuf,
    classpath: OsString,
    config: PathBuf,
    log4j: PathBuf,
    log: PathBuf,
    dir: tempfile::TempDir,
}

impl Kafka {
    pub async fn start(c: &Components) -> Result<Self> {
        Self::start_on(c, Ipv4Addr::LOCALHOST).await
    }

    /// Listens on (and advertises) `host` instead of loopback: clients must reach
    /// the advertised address, so a broker for pods advertises the address pods see.
    pub async fn start_on(c: &Components, host: Ipv4Addr) -> Result<Self> {
        let dir = process::server_dir("kafka")?;
        let root = dir.path();
        let port = process::free_port()?;
        let controller_port = loop {
            let p = process::free_port()?;
            if p != port {
                break p;
            }
        };
        let config = root.join("server.properties");
        let log4j = root.join("log4j2.properties");
        let log = root.join("kafka.log");
        let data = root.join("data");
        let mut classpath = c.kafka_libs.clone().into_os_string();
        classpath.push("/*");

        let properties = format!(
            "# Written by the test bed: one node that is both broker and controller.\n\
             process.roles=broker,controller\n\
             node.id=1\n\
             controller.quorum.voters=1@127.0.0.1:{controller_port}\n\
             listeners=PLAINTEXT://{host}:{port},CONTROLLER://127.0.0.1:{controller_port}\n\
             advertised.listeners=PLAINTEXT://{host}:{port}\n\
             controller.listener.names=CONTROLLER\n\
             inter.broker.listener.name=PLAINTEXT\n\
             listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT\n\
             log.dirs={data}\n\
             num.partitions=1\n\
             auto.create.topics.enable=false\n\
             offsets.topic.replication.factor=1\n\
             transaction.state.log.replication.factor=1\n\
             transaction.state.log.min.isr=1\n\
             share.coordinator.state.topic.replication.factor=1\n\
             share.coordinator.state.topic.min.isr=1\n\
             # Fewer internal partitions: the first consumer group or transactional\n\
             # producer otherwise waits for 50 partitions to be created.\n\
             offsets.topic.num.partitions=4\n\
             transaction.state.log.num.partitions=4\n\
             # Consumer groups in tests should not wait 3 s for more members.\n\
             group.initial.rebalance.delay.ms=0\n",
            data = data.display(),
        );
        write(&config, &properties)?;
        write(
            &log4j,
            "status = warn\n\
             appender.out.type = Console\n\
             appender.out.name = OUT\n\
             appender.out.layout.type = PatternLayout\n\
             appender.out.layout.pattern = [%d] %p %m (%c)%n\n\
             rootLogger.level = INFO\n\
             rootLogger.appenderRef.out.ref = OUT\n\
             logger.state.name = state.change.logger\n\
             logger.state.level = WARN\n\
             logger.request.name = kafka.request.logger\n\
             logger.request.level = WARN\n",
        )?;

        // A KRaft node refuses to start on unformatted storage.
        let mut format = Command::new(&c.java);
        format
            .current_dir(root)
            // A short-lived tool: a small heap and the client JIT start faster.
            .args(["-Xmx256m", "-XX:+UseSerialGC", "-XX:TieredStopAtLevel=1"])
            .arg(format!("-Dlog4j2.configurationFile={}", log4j.display()))
            .arg("-cp")
            .arg(&classpath)
            .args([
                "kafka.tools.StorageTool",
                "format",
                "--cluster-id",
                &cluster_id(),
                "--config",
            ])
            .arg(&config);
        process::run_logged("kafka storage format", format, &log).await?;

        let kafka = Self {
            server: Restartable::new("kafka"),
            host,
            port,
            java: c.java.clone(),
            classpath,
            config,
            log4j,
            log,
            dir,
        };
        kafka.launch().await?;
        Ok(kafka)
    }

    async fn launch(&self) -> Result<()> {
        let mut args: Vec<OsString> = [
            "-Xmx512m",
            "-Xms128m",
            // Serial GC: the smallest footprint on a 2-core machine shared with the
            // other servers and the compiler.
            "-XX:+UseSerialGC",
            "-Djava.awt.headless=true",
        ]
        .into_iter()
        .map(OsString::from)
        .collect();
        args.push(format!("-Dlog4j2.configurationFile={}", self.log4j.display()).into());
        args.push(format!("-Dkafka.logs.dir={}", self.dir.path().display()).into());
        args.push("-cp".into());
        args.push(self.classpath.clone());
        args.push("kafka.Kafka".into());
        args.push(self.config.clone().into());
        let mut server = Supervised::spawn(Spec {
            name: "kafka",
            program: &self.java,
            args,
            stop_signal: "TERM",
            kill_signal: "KILL",
            grace_secs: 15,
            log: &self.log,
            cleanup_dir: self.dir.path(),
            run_as: None,
            env: Vec::new(),
        })?;
        let bootstrap = self.bootstrap();
        let (host, port) = (self.host, self.port);
        process::wait_ready(&mut server, START_TIMEOUT, || {
            let bootstrap = bootstrap.clone();
            async move {
                // Cheap check first, so librdkafka is not spun up (and does not log
                // connection errors) while the JVM is still booting.
                tokio::net::TcpStream::connect((host, port))
                    .await
                    .map_err(|e| format!("connect {host}:{port}: {e}"))?;
                let brokers = tokio::task::spawn_blocking(move || {
                    let consumer: BaseConsumer = base_config(&bootstrap)
                        .create()
                        .map_err(|e| format!("creating a metadata client: {e}"))?;
                    let md = consumer
                        .fetch_metadata(None, Duration::from_secs(2))
                        .map_err(|e| format!("metadata request: {e}"))?;
                    Ok::<_, String>(md.brokers().len())
                })
                .await
                .map_err(|e| e.to_string())??;
                if brokers == 0 {
                    Err("metadata lists no broker yet".into())
                } else {
                    Ok(())
                }
            }
        })
        .await?;
        self.server.set(server);
        Ok(())
    }

    /// `<host>:<port>` (host 127.0.0.1 unless started with [`Kafka::start_on`]), for
    /// `bootstrap.servers`.
    pub fn bootstrap(&self) -> String {
        format!("{}:{}", self.host, self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The broker log (kept only while the broker's temp dir exists).
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// Creates a topic with replication factor 1 and waits until every partition
    /// has a leader, so producing right after does not race the creation.
    pub async fn create_topic(&self, name: &str, partitions: i32) -> Result<()> {
        self.create_topic_with_config(name, partitions, &[]).await
    }

    /// [`Kafka::create_topic`] with topic configs such as `("cleanup.policy", "compact")`.
    pub async fn create_topic_with_config(&self, name: &str, partitions: i32, config: &[(&str, &str)]) -> Result<()> {
        let admin: AdminClient<DefaultClientContext> = base_config(&self.bootstrap())
            .create()
            .context(|| "creating a Kafka admin client".into())?;
        let mut topic = NewTopic::new(name, partitions, TopicReplication::Fixed(1));
        for (k, v) in config {
            topic = topic.set(k, v);
        }
        let opts = AdminOptions::new().operation_timeout(Some(TOPIC_TIMEOUT));
        let results = admin
            .create_topics([&topic], &opts)
            .await
            .context(|| format!("creating topic {name}"))?;
        for r in results {
            if let Err((topic, code)) = r {
                return Err(TestbedError::Other(format!("creating topic {topic}: {code}")));
            }
        }
        drop(admin);

        let bootstrap = self.bootstrap();
        let topic = name.to_string();
        tokio::task::spawn_blocking(move || wait_for_leaders(&bootstrap, &topic, partitions))
            .await
            .map_err(|e| TestbedError::Other(format!("waiting for topic {name}: {e}")))?
    }

    /// Clean shutdown; data and ports are kept for [`Kafka::start_again`]. Only for
    /// a private instance, never the shared one.
    pub async fn stop(&self) -> Result<()> {
        self.halt(Stop::Graceful).await
    }

    /// SIGKILL to the broker: a crash.
    pub async fn kill(&self) -> Result<()> {
        self.halt(Stop::Kill).await
    }

    async fn halt(&self, how: Stop) -> Result<()> {
        self.server.halt(how).await
    }

    /// Starts the broker again with the same data and ports.
    pub async fn start_again(&self) -> Result<()> {
        self.server.ensure_stopped()?;
        self.launch().await
    }
}

fn base_config(bootstrap: &str) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", bootstrap)
        // The bed's own clients should give up quickly; callers retry.
        .set("socket.timeout.ms", "5000")
        .set("log_level", "3");
    c
}

fn wait_for_leaders(bootstrap: &str, topic: &str, partitions: i32) -> Result<()> {
    let consumer: BaseConsumer = base_config(bootstrap)
        .create()
        .context(|| "creating a Kafka metadata client".into())?;
    let deadline = Instant::now() + TOPIC_TIMEOUT;
    loop {
        let ready = match consumer.fetch_metadata(Some(topic), Duration::from_secs(2)) {
            Ok(md) => md.topics().iter().any(|t| {
                t.name() == topic
                    && t.error().is_none()
                    && t.partitions().len() == partitions as usize
                    && t.partitions().iter().all(|p| p.leader() >= 0 && p.error().is_none())
            }),
            Err(_) => false,
        };
        if ready {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(TestbedError::Other(format!(
                "topic {topic}: partitions without a leader after {TOPIC_TIMEOUT:?}"
            )));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn write(path: &Path, text: &str) -> Result<()> {
    std::fs::write(path, text).context(|| format!("writing {}", path.display()))
}

/// A KRaft cluster id: 16 random bytes in URL-safe base64 without padding, the form
/// `kafka-storage random-uuid` prints (done here to save a JVM start).
fn cluster_id() -> String {
    // Kafka's own generator also rejects ids starting with '-': the command-line
    // parser would take them for an option.
    loop {
        let id = encode_cluster_id(rand::random());
        if !id.starts_with('-') {
            return id;
        }
    }
}

fn encode_cluster_id(bytes: [u8; 16]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut bits: u32 = 0;
    let mut nbits = 0;
    let mut out = String::with_capacity(22);
    for b in bytes {
        bits = (bits << 8) | u32::from(b);
        nbits += 8;
        while nbits >= 6 {
            nbits -= 6;
            out.push(char::from(ALPHABET[((bits >> nbits) & 0x3f) as usize]));
        }
    }
    if nbits > 0 {
        out.push(char::from(ALPHABET[((bits << (6 - nbits)) & 0x3f) as usize]));
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn cluster_ids_have_kafkas_shape() {
        let id = super::cluster_id();
        assert_eq!(id.len(), 22, "{id}");
        assert!(
            id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_'),
            "{id}"
        );
        assert!(!id.starts_with('-'));
        // Known base64url encodings (128 bits = 21 full sextets + 2 bits).
        assert_eq!(super::encode_cluster_id([0; 16]), "AAAAAAAAAAAAAAAAAAAAAA");
        assert_eq!(super::encode_cluster_id([0xff; 16]), "_____________________w");
    }
}
