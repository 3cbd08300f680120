//! Apache Kafka brokers for the integration tests: the real `kafka.Kafka`, single-node
//! KRaft (combined broker and controller), on 127.0.0.1.
//!
//! `scripts/test` fetches the broker's jars from Maven Central (the version pinned in
//! `scripts/kafka/pom.xml`) into `$PROVISIONER_CACHE` and exports `KAFKA_LIBS`. Each broker
//! gets a run directory of its own: its `server.properties`, a throwaway CA and server
//! certificate, its log directory (formatted with Kafka's own storage tool, SCRAM user
//! included) and `server.log`.
//!
//! Every broker has two client listeners: `PLAINTEXT`, which nearly every test uses, and
//! `SASL_SSL` (SCRAM-SHA-512 over TLS, verified against the throwaway CA), which the
//! security tests use end to end.
//!
//! * [`broker()`] is the broker the whole test binary shares, started on first use.
//! * [`Broker::start_own`] starts one for a single test that stops and restarts it.
//!
//! A broker runs under `sh`, whose stdin is a pipe held by this process. When the pipe
//! closes (the test binary exits, passes or fails, or is killed; or [`Broker::stop`]),
//! the shell sends the JVM SIGTERM, Kafka shuts down cleanly, and the shell removes the
//! shared broker's run directory. So no broker outlives its tests.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use openssl::asn1::Asn1Time;
use openssl::bn::{BigNum, MsbOption};
use openssl::hash::MessageDigest;
use openssl::pkey::{PKey, Private};
use openssl::rsa::Rsa;
use openssl::x509::extension::{BasicConstraints, KeyUsage, SubjectAlternativeName};
use openssl::x509::{X509Name, X509};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;

/// The SCRAM user every test broker is formatted with.
pub const SCRAM_USERNAME: &str = "provisioner-test";

/// Heap bounds for one broker JVM: enough for the suite's load, small enough that a test
/// with a broker of its own can run beside the shared one on a 2-core, shared machine.
const HEAP: [&str; 2] = ["-Xms128m", "-Xmx512m"];

pub struct Broker {
    /// The PLAINTEXT listener.
    pub bootstrap_servers: String,
    /// The SASL_SSL listener (SCRAM-SHA-512 over TLS).
    pub sasl_ssl_bootstrap_servers: String,
    /// The SCRAM password of [`SCRAM_USERNAME`] (random per broker).
    pub scram_password: String,
    /// PEM file of the throwaway CA that signed the broker's certificate.
    pub ca_file: PathBuf,
    run_dir: PathBuf,
    process: Mutex<Option<Child>>,
    shared: bool,
    /// Owns the run directory of a broker started with [`Broker::start_own`].
    _own_dir: Option<tempfile::TempDir>,
}

static BROKER: OnceLock<Broker> = OnceLock::new();

/// The broker shared by the whole test binary, started on first use.
pub fn broker() -> &'static Broker {
    BROKER.get_or_init(|| {
        let run_dir = tempfile::Builder::new()
            .prefix("provisioner-kafka-")
            .tempdir()
            .expect("a temporary directory")
            .keep();
        // The shell removes this directory once the broker has stopped.
        Broker::start_in(run_dir, true)
    })
}

/// The jars of the pinned Kafka version: `KAFKA_LIBS`, else the newest complete copy that
/// `scripts/test` left in the cache.
pub fn kafka_libs() -> PathBuf {
    if let Some(path) = std::env::var_os("KAFKA_LIBS").filter(|path| !path.is_empty()) {
        let path = PathBuf::from(path);
        assert!(
            path.join(".complete").exists(),
            "KAFKA_LIBS={} holds no complete copy of Kafka's jars: run scripts/test",
            path.display()
        );
        return path;
    }
    let version = kafka_version();
    let cache = cache_dir();
    let prefix = format!("kafka-{version}-");
    std::fs::read_dir(&cache)
        .ok()
        .into_iter()
        .flatten()
        .filter_map(|entry| entry.ok())
        .filter(|entry| entry.file_name().to_string_lossy().starts_with(&prefix))
        .map(|entry| entry.path().join("libs"))
        .find(|libs| libs.join(".complete").exists())
        .unwrap_or_else(|| {
            panic!(
                "no Apache Kafka {version} jars under {}: run scripts/test (it fetches them from \
                 Maven Central) or set KAFKA_LIBS",
                cache.display()
            )
        })
}

/// The Kafka version the tests use, as pinned in `scripts/kafka/pom.xml`.
pub fn kafka_version() -> String {
    let pom = include_str!("../../../scripts/kafka/pom.xml");
    let start = pom.find("<kafka.version>").expect("kafka.version in the pom") + "<kafka.version>".len();
    let end = start + pom[start..].find("</kafka.version>").expect("closing tag");
    pom[start..end].trim().to_string()
}

fn cache_dir() -> PathBuf {
    std::env::var_os("PROVISIONER_CACHE")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("XDG_CACHE_HOME").map(|path| PathBuf::from(path).join("provisioner")))
        .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache/provisioner"))
}

fn java() -> PathBuf {
    std::env::var_os("JAVA_HOME")
        .map(|home| PathBuf::from(home).join("bin/java"))
        .filter(|path| path.exists())
        .unwrap_or_else(|| PathBuf::from("java"))
}

fn classpath() -> String {
    format!("{}/*", kafka_libs().display())
}

/// Runs one of Kafka's command-line tools (a class with a `main`) and returns its stdout.
pub fn kafka_tool(class: &str, args: &[&str]) -> String {
    let output = Command::new(java())
        .args(HEAP)
        .arg("-cp")
        .arg(classpath())
        .arg(class)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|error| panic!("cannot run java {class}: {error} (is a JDK 17 on PATH?)"));
    assert!(
        output.status.success(),
        "{class} {args:?} failed: {:?}\n{}{}",
        output.status.code(),
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).expect("UTF-8 from a Kafka tool")
}

fn log4j_config() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("scripts/kafka/log4j2.properties")
}

/// Three loopback ports for the PLAINTEXT, SASL_SSL and CONTROLLER listeners. The JVM
/// must bind them itself, so they are released here; a port taken in between makes the
/// broker exit at start-up, and [`Broker::start_in`] then tries again with new ports.
fn three_ports() -> [u16; 3] {
    let listeners: Vec<TcpListener> = (0..3)
        .map(|_| TcpListener::bind("127.0.0.1:0").expect("a free loopback port"))
        .collect();
    let ports: Vec<u16> = listeners
        .iter()
        .map(|listener| listener.local_addr().expect("bound").port())
        .collect();
    [ports[0], ports[1], ports[2]]
}

fn random_token(bytes: usize) -> String {
    use base64::Engine;
    let random: Vec<u8> = (0..bytes).map(|_| rand::random::<u8>()).collect();
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(random)
}

impl Broker {
    /// A broker for one test alone (one that stops or restarts its broker). Its run
    /// directory is removed when the returned value is dropped.
    pub fn start_own() -> Broker {
        let dir = tempfile::Builder::new()
            .prefix("provisioner-kafka-own-")
            .tempdir()
            .expect("a temporary directory");
        let mut broker = Broker::start_in(dir.path().to_path_buf(), false);
        broker._own_dir = Some(dir);
        broker
    }

    /// Formats storage in `run_dir` and starts the broker there, with fresh ports on
    /// each try (up to three) when one was taken meanwhile.
    /// `shared`: the broker of the whole test binary, whose run directory the shell
    /// removes after the JVM has exited (a static is never dropped).
    fn start_in(run_dir: PathBuf, shared: bool) -> Broker {
        let scram_password = random_token(18);
        let ca_file = run_dir.join("ca.pem");
        write_tls_material(&run_dir);
        let mut last_failure = String::new();
        for _attempt in 0..3 {
            let [plaintext, sasl_ssl, controller] = three_ports();
            let data_dir = run_dir.join("data");
            let _ = std::fs::remove_dir_all(&data_dir);
            std::fs::write(
                run_dir.join("server.properties"),
                server_properties(&run_dir, plaintext, sasl_ssl, controller),
            )
            .expect("server.properties written");
            let properties = run_dir.join("server.properties");
            kafka_tool(
                "kafka.tools.StorageTool",
                &[
                    "format",
                    "--ignore-formatted",
                    // One token: a random id may start with `-`, which the tool's
                    // argument parser would take for an option (1 start in 64 failed).
                    &format!("--cluster-id={}", random_token(16)),
                    "--config",
                    properties.to_str().expect("UTF-8 path"),
                    "--add-scram",
                    &format!("SCRAM-SHA-512=[name={SCRAM_USERNAME},password={scram_password}]"),
                ],
            );
            let broker = Broker {
                bootstrap_servers: format!("127.0.0.1:{plaintext}"),
                sasl_ssl_bootstrap_servers: format!("127.0.0.1:{sasl_ssl}"),
                scram_password: scram_password.clone(),
                ca_file: ca_file.clone(),
                run_dir: run_dir.clone(),
                process: Mutex::new(None),
                shared,
                _own_dir: None,
            };
            match broker.launch() {
                Ok(()) => return broker,
                Err(failure) => last_failure = failure,
            }
        }
        panic!("Apache Kafka did not start in {}: {last_failure}", run_dir.display());
    }

    /// Starts the JVM on this broker's configuration and waits until both client
    /// listeners accept connections and the broker answers metadata requests.
    fn launch(&self) -> Result<(), String> {
        // The shared broker's run directory is removed by the shell after the JVM exits;
        // a broker of one test's own keeps it until its TempDir is dropped.
        let remove_after = if self.shared {
            self.run_dir.display().to_string()
        } else {
            String::new()
        };
        let mut process = Command::new("sh")
            .arg("-c")
            .arg(concat!(
                // fd 3 keeps the pipe from the test binary: a background job's stdin is
                // /dev/null in a non-interactive shell.
                r#"exec 3<&0; remove_after="$1"; shift; "$@" & child=$!; "#,
                r#"( cat <&3 >/dev/null; kill -TERM $child 2>/dev/null ) & watcher=$!; exec 3<&-; "#,
                r#"wait $child; status=$?; kill $watcher 2>/dev/null; "#,
                r#"[ -n "$remove_after" ] && rm -rf "$remove_after"; exit $status"#
            ))
            .arg("sh")
            .arg(&remove_after)
            .arg(java())
            .args(HEAP)
            .arg("-XX:+UseSerialGC")
            .arg(format!("-Dlog4j2.configurationFile={}", log4j_config().display()))
            .arg(format!("-Dkafka.logs.dir={}", self.run_dir.display()))
            .arg("-cp")
            .arg(classpath())
            .arg("kafka.Kafka")
            .arg(self.run_dir.join("server.properties"))
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(if std::env::var_os("TEST_LOG").is_some() {
                Stdio::inherit()
            } else {
                Stdio::null()
            })
            .spawn()
            .map_err(|error| format!("cannot start java: {error} (is a JDK 17 on PATH?)"))?;
        let deadline = Instant::now() + Duration::from_secs(90);
        for address in [&self.bootstrap_servers, &self.sasl_ssl_bootstrap_servers] {
            let address: SocketAddr = address.parse().expect("a socket address");
            while TcpStream::connect_timeout(&address, Duration::from_millis(200)).is_err() {
                if let Ok(Some(status)) = process.try_wait() {
                    return Err(format!("the broker exited ({status}); {}", self.log_tail()));
                }
                if Instant::now() > deadline {
                    let _ = process.kill();
                    return Err(format!(
                        "nothing listened on {address} within 90 s; {}",
                        self.log_tail()
                    ));
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        *self.process.lock().unwrap() = Some(process);
        self.wait_until_serving(deadline)
    }

    /// Polls metadata until the broker has registered and answers (a listener accepts
    /// connections a moment before the broker can serve them).
    fn wait_until_serving(&self, deadline: Instant) -> Result<(), String> {
        use rdkafka::consumer::{BaseConsumer, Consumer};
        let consumer: BaseConsumer = self.client_config().create().map_err(|error| error.to_string())?;
        loop {
            let answer = consumer
                .fetch_metadata(None, Duration::from_secs(2))
                .map(|metadata| metadata.brokers().len());
            match answer {
                Ok(brokers) if brokers > 0 => return Ok(()),
                _ if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(100)),
                other => return Err(format!("no metadata from the broker ({other:?}); {}", self.log_tail())),
            }
        }
    }

    fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(self.run_dir.join("server.log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        format!(
            "last lines of {}:\n{}",
            self.run_dir.join("server.log").display(),
            lines[lines.len().saturating_sub(20)..].join("\n")
        )
    }

    /// Stops the broker cleanly (SIGTERM, Kafka's controlled shutdown) and waits for the
    /// JVM to exit. Its data stays, so [`Broker::restart`] brings the same topics back.
    pub fn stop(&self) {
        let process = self.process.lock().unwrap().take();
        if let Some(mut process) = process {
            drop(process.stdin.take());
            let _ = process.wait();
        }
    }

    /// Starts a stopped broker again on the same ports and data.
    pub fn restart(&self) {
        assert!(!self.shared, "only a broker of a test's own may be restarted");
        self.launch()
            .unwrap_or_else(|failure| panic!("the broker did not restart: {failure}"));
    }

    /// The log directory of `topic`'s `partition`.
    pub fn partition_dir(&self, topic: &str, partition: i32) -> PathBuf {
        self.run_dir.join("data").join(format!("{topic}-{partition}"))
    }

    /// The record batches of `topic`'s `partition`, as Kafka's own log dump tool
    /// (`kafka.tools.DumpLogSegments`) reads them from the segment files.
    pub fn record_batches(&self, topic: &str, partition: i32) -> Vec<RecordBatch> {
        let dir = self.partition_dir(topic, partition);
        let mut segments: Vec<PathBuf> = std::fs::read_dir(&dir)
            .unwrap_or_else(|error| panic!("cannot list {}: {error}", dir.display()))
            .filter_map(|entry| entry.ok().map(|entry| entry.path()))
            .filter(|path| path.extension().is_some_and(|extension| extension == "log"))
            .collect();
        segments.sort();
        let mut batches = Vec::new();
        for segment in segments {
            let dump = kafka_tool(
                "kafka.tools.DumpLogSegments",
                &["--files", segment.to_str().expect("UTF-8 path")],
            );
            batches.extend(dump.lines().filter_map(RecordBatch::parse));
        }
        batches
    }

    pub fn client_config(&self) -> ClientConfig {
        let mut config = ClientConfig::new();
        config.set("bootstrap.servers", &self.bootstrap_servers);
        config
    }

    /// Creates topics with `partitions` partitions each, through the Kafka admin API.
    pub async fn create_topics(&self, names: &[&str], partitions: i32) {
        self.create_topics_with(names, partitions, &[]).await;
    }

    /// Creates topics with `partitions` partitions each and the given topic configs.
    pub async fn create_topics_with(&self, names: &[&str], partitions: i32, configs: &[(&str, &str)]) {
        let admin: AdminClient<DefaultClientContext> = self.client_config().create().expect("admin client");
        let topics: Vec<NewTopic> = names
            .iter()
            .map(|name| {
                configs.iter().fold(
                    NewTopic::new(name, partitions, TopicReplication::Fixed(1)),
                    |topic, (key, value)| topic.set(key, value),
                )
            })
            .collect();
        let results = admin
            .create_topics(
                &topics,
                &AdminOptions::new().operation_timeout(Some(Duration::from_secs(10))),
            )
            .await
            .expect("CreateTopics answered");
        for result in results {
            if let Err((topic, code)) = result {
                panic!("cannot create topic {topic}: {code:?}");
            }
        }
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.stop();
    }
}

/// One record batch as `DumpLogSegments` prints it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordBatch {
    pub base_offset: i64,
    pub last_offset: i64,
    pub count: i64,
}

impl RecordBatch {
    /// Parses a line such as `baseOffset: 0 lastOffset: 9 count: 10 baseSequence: …`.
    fn parse(line: &str) -> Option<RecordBatch> {
        let field = |name: &str| -> Option<i64> {
            let mut words = line.split_whitespace();
            words.find(|word| *word == name)?;
            words.next()?.parse().ok()
        };
        Some(RecordBatch {
            base_offset: field("baseOffset:")?,
            last_offset: field("lastOffset:")?,
            count: field("count:")?,
        })
    }
}

fn server_properties(run_dir: &Path, plaintext: u16, sasl_ssl: u16, controller: u16) -> String {
    let data = run_dir.join("data");
    let keystore = run_dir.join("server.pem");
    format!(
        "# Generated by tests/it/support/broker.rs: one combined broker and controller.
process.roles=broker,controller
node.id=1
controller.quorum.voters=1@127.0.0.1:{controller}
controller.listener.names=CONTROLLER
listeners=PLAINTEXT://127.0.0.1:{plaintext},SASL_SSL://127.0.0.1:{sasl_ssl},CONTROLLER://127.0.0.1:{controller}
advertised.listeners=PLAINTEXT://127.0.0.1:{plaintext},SASL_SSL://127.0.0.1:{sasl_ssl}
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,SASL_SSL:SASL_SSL,CONTROLLER:PLAINTEXT
inter.broker.listener.name=PLAINTEXT
log.dirs={data}

# SASL_SSL: SCRAM-SHA-512 (the user is added when the storage is formatted) over TLS with
# a certificate from a throwaway CA, for 127.0.0.1 and localhost.
sasl.enabled.mechanisms=SCRAM-SHA-512
listener.name.sasl_ssl.scram-sha-512.sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required;
ssl.keystore.type=PEM
ssl.keystore.location={keystore}

# One node: internal topics with one replica; groups rebalance without the initial delay
# and may use the short session timeouts the crash and rebalance tests set.
offsets.topic.replication.factor=1
offsets.topic.num.partitions=4
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
group.initial.rebalance.delay.ms=0
group.min.session.timeout.ms=1000
num.partitions=1
auto.create.topics.enable=true
num.network.threads=2
num.io.threads=4
",
        data = data.display(),
        keystore = keystore.display(),
    )
}

/// A throwaway CA (`ca.pem`) and a server certificate it signed for 127.0.0.1 and
/// localhost, with its unencrypted PKCS#8 key (`server.pem`, Kafka's PEM keystore).
fn write_tls_material(run_dir: &Path) {
    let (ca_key, ca) = certificate("provisioner test CA", None, true);
    let (server_key, server) = certificate("localhost", Some((&ca_key, &ca)), false);
    std::fs::write(run_dir.join("ca.pem"), ca.to_pem().unwrap()).expect("ca.pem written");
    let mut keystore = server_key.private_key_to_pem_pkcs8().unwrap();
    keystore.extend(server.to_pem().unwrap());
    keystore.extend(ca.to_pem().unwrap());
    std::fs::write(run_dir.join("server.pem"), keystore).expect("server.pem written");
}

fn certificate(common_name: &str, issuer: Option<(&PKey<Private>, &X509)>, is_ca: bool) -> (PKey<Private>, X509) {
    let key = PKey::from_rsa(Rsa::generate(2048).unwrap()).unwrap();
    let mut name = X509Name::builder().unwrap();
    name.append_entry_by_text("CN", common_name).unwrap();
    let name = name.build();
    let mut builder = X509::builder().unwrap();
    builder.set_version(2).unwrap();
    let mut serial = BigNum::new().unwrap();
    serial.rand(64, MsbOption::MAYBE_ZERO, false).unwrap();
    builder.set_serial_number(&serial.to_asn1_integer().unwrap()).unwrap();
    builder.set_subject_name(&name).unwrap();
    builder.set_pubkey(&key).unwrap();
    builder.set_not_before(&Asn1Time::days_from_now(0).unwrap()).unwrap();
    builder.set_not_after(&Asn1Time::days_from_now(2).unwrap()).unwrap();
    if is_ca {
        builder
            .append_extension(BasicConstraints::new().critical().ca().build().unwrap())
            .unwrap();
        builder
            .append_extension(KeyUsage::new().critical().key_cert_sign().crl_sign().build().unwrap())
            .unwrap();
    } else {
        let san = SubjectAlternativeName::new()
            .ip("127.0.0.1")
            .dns("localhost")
            .build(&builder.x509v3_context(issuer.map(|(_, ca)| ca.as_ref()), None))
            .unwrap();
        builder.append_extension(san).unwrap();
    }
    let signing_key = match issuer {
        Some((ca_key, ca)) => {
            builder.set_issuer_name(ca.subject_name()).unwrap();
            ca_key
        }
        None => {
            builder.set_issuer_name(&name).unwrap();
            &key
        }
    };
    builder.sign(signing_key, MessageDigest::sha256()).unwrap();
    (key, builder.build())
}
