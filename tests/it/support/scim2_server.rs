//! A real SCIM 2.0 server (`scim2-server` from PyPI) on 127.0.0.1, one per test.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct Scim2Server {
    pub base_url: String,
    process: Child,
}

impl Drop for Scim2Server {
    fn drop(&mut self) {
        // Closing stdin makes the wrapper shell stop the server.
        drop(self.process.stdin.take());
        let _ = self.process.wait();
    }
}

fn binary() -> PathBuf {
    if let Ok(path) = std::env::var("SCIM2_SERVER_BIN") {
        return PathBuf::from(path);
    }
    let cache = std::env::var_os("PROVISIONER_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache/provisioner"));
    // scripts/test creates the venv; its name carries the pinned versions.
    std::fs::read_dir(&cache)
        .ok()
        .into_iter()
        .flatten()
        .filter_map(|entry| entry.ok().map(|entry| entry.path().join("bin/scim2-server")))
        .find(|candidate| candidate.exists())
        .unwrap_or_else(|| {
            panic!(
                "no scim2-server: run scripts/test (it installs it under {}) or set SCIM2_SERVER_BIN",
                cache.display()
            )
        })
}

/// Runs `scim2-server`'s own `main`, telling us the port the OS picked: the command
/// prints the port it was given (`0`), not the one it bound.
const PORT_REPORTING_MAIN: &str = r#"
import sys
import scim2_server.testserver.cli as cli
bind = cli.make_server
def make_server(*args, **kwargs):
    server = bind(*args, **kwargs)
    print(f"LISTENING {server.server_port}", flush=True)
    return server
cli.make_server = make_server
sys.argv[0] = "scim2-server"
cli.main()
"#;

impl Scim2Server {
    /// Starts a server on a port the OS picks (`--port 0`), read back from its output.
    pub async fn start() -> Scim2Server {
        Scim2Server::start_with_args(&[]).await
    }

    /// Starts a server with extra `scim2-server` arguments (e.g. `--service-provider-config
    /// FILE`). It reads the files it is given before it reports its port, so they may go
    /// once this returns.
    pub async fn start_with_args(args: &[&std::ffi::OsStr]) -> Scim2Server {
        let python = binary().with_file_name("python");
        let mut process = Command::new("sh")
            .arg("-c")
            .arg(r#""$@" </dev/null & child=$!; cat >/dev/null; kill $child 2>/dev/null; wait $child"#)
            .arg("sh")
            .arg(&python)
            .args(["-c", PORT_REPORTING_MAIN, "--hostname", "127.0.0.1", "--port", "0"])
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(if std::env::var_os("TEST_LOG").is_some() {
                Stdio::inherit()
            } else {
                Stdio::null()
            })
            .spawn()
            .expect("scim2-server starts");
        let stdout = process.stdout.take().expect("piped stdout");
        let port = tokio::task::spawn_blocking(move || {
            let mut lines = std::io::BufRead::lines(std::io::BufReader::new(stdout));
            let port = lines.find_map(|line| line.ok()?.strip_prefix("LISTENING ")?.trim().parse::<u16>().ok());
            // Keep reading (and discarding) so the server never writes into a closed pipe.
            std::thread::spawn(move || lines.for_each(drop));
            port
        });
        let port = tokio::time::timeout(Duration::from_secs(30), port)
            .await
            .expect("scim2-server reported its port within 30 s")
            .expect("the reader did not panic")
            .unwrap_or_else(|| panic!("scim2-server ({}) exited without reporting its port", python.display()));
        let base_url = format!("http://127.0.0.1:{port}");
        let server = Scim2Server { base_url, process };
        let deadline = Instant::now() + Duration::from_secs(30);
        let config_url = format!("{}/ServiceProviderConfig", server.base_url);
        loop {
            if let Ok(response) = reqwest::get(&config_url).await {
                if response.status().is_success() {
                    break;
                }
            }
            assert!(Instant::now() < deadline, "scim2-server did not answer within 30 s");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        server
    }

    /// The server's built-in resource `name` (e.g. `default-schemas.json`), to start
    /// another server with a changed copy.
    pub fn default_resource(name: &str) -> serde_json::Value {
        let output = Command::new(binary().with_file_name("python"))
            .args([
                "-c",
                "import importlib.resources, sys; \
                 sys.stdout.write((importlib.resources.files('scim2_server') / 'resources' / sys.argv[1]).read_text())",
                name,
            ])
            .output()
            .expect("scim2-server's python runs");
        assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
        serde_json::from_slice(&output.stdout).expect("a JSON resource")
    }

    /// Every user the server holds.
    pub async fn users(&self) -> Vec<serde_json::Value> {
        let list: serde_json::Value = reqwest::get(format!("{}/Users", self.base_url))
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        list["Resources"].as_array().cloned().unwrap_or_default()
    }

    pub async fn user_by_external_id(&self, external_id: &str) -> Option<serde_json::Value> {
        self.users()
            .await
            .into_iter()
            .find(|user| user["externalId"] == external_id)
    }

    /// Creates a user directly, as another system would have.
    pub async fn create_directly(&self, resource: serde_json::Value) -> serde_json::Value {
        let response = reqwest::Client::new()
            .post(format!("{}/Users", self.base_url))
            .header("content-type", "application/scim+json")
            .json(&resource)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status().as_u16(), 201);
        response.json().await.unwrap()
    }
}
