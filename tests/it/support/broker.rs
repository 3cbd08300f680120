//! A tansu broker process shared by the whole test binary.
//!
//! It is started through `sh`, whose stdin is a pipe held by this process: when the
//! test binary exits (or is killed), the pipe closes and the shell kills the broker,
//! so no broker outlives its tests.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;

pub struct Broker {
    pub bootstrap_servers: String,
    _process: Mutex<Child>,
}

static BROKER: OnceLock<Broker> = OnceLock::new();

/// The shared broker, started on first use.
pub fn broker() -> &'static Broker {
    BROKER.get_or_init(start)
}

fn tansu_binary() -> PathBuf {
    if let Ok(path) = std::env::var("TANSU_BIN") {
        return PathBuf::from(path);
    }
    let cached = dirs_cache().join("tansu-0.6.0/bin/tansu");
    if cached.exists() {
        return cached;
    }
    panic!(
        "no tansu broker binary: run scripts/test (it installs tansu into {}) or set TANSU_BIN",
        cached.display()
    );
}

fn dirs_cache() -> PathBuf {
    std::env::var_os("PROVISIONER_CACHE")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("XDG_CACHE_HOME").map(|path| PathBuf::from(path).join("provisioner")))
        .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache/provisioner"))
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .map(|address| address.port())
        .expect("a free loopback port")
}

fn start() -> Broker {
    let binary = tansu_binary();
    let port = free_port();
    let url = format!("tcp://127.0.0.1:{port}");
    let process = Command::new("sh")
        .arg("-c")
        .arg(r#""$@" & child=$!; cat >/dev/null; kill $child 2>/dev/null; wait $child"#)
        .arg("sh")
        .arg(&binary)
        .args(["broker", "--listener-url", &url, "--advertised-listener-url", &url])
        .args([
            "--storage-engine",
            "memory://tansu/",
            "--cluster-id",
            "provisioner-tests",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(if std::env::var_os("TEST_LOG").is_some() {
            Stdio::inherit()
        } else {
            Stdio::null()
        })
        .spawn()
        .unwrap_or_else(|error| panic!("cannot start {}: {error}", binary.display()));
    let address: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while TcpStream::connect_timeout(&address, Duration::from_millis(200)).is_err() {
        assert!(
            Instant::now() < deadline,
            "tansu did not listen on {address} within 30 s"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    Broker {
        bootstrap_servers: format!("127.0.0.1:{port}"),
        _process: Mutex::new(process),
    }
}

impl Broker {
    pub fn client_config(&self) -> ClientConfig {
        let mut config = ClientConfig::new();
        config.set("bootstrap.servers", &self.bootstrap_servers);
        config
    }

    /// Creates topics with `partitions` partitions each, through the Kafka admin API.
    pub async fn create_topics(&self, names: &[&str], partitions: i32) {
        let admin: AdminClient<DefaultClientContext> = self.client_config().create().expect("admin client");
        let topics: Vec<NewTopic> = names
            .iter()
            .map(|name| NewTopic::new(name, partitions, TopicReplication::Fixed(1)))
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
