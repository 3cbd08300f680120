//! HTTP plumbing shared by the connectors: the client and its settings
//! (`[connectors.<name>.http]`), status classification, `Retry-After`, and turning
//! transport failures into [`ConnectorError`]s.

use std::path::PathBuf;
use std::time::Duration;

use reqwest::header::HeaderMap;
use reqwest::StatusCode;
use serde::{Deserialize, Serialize};

use crate::connectors::{BuildError, ConnectorError};

/// Longest `Retry-After` we accept; a larger hint is capped (the retry budget decides).
const MAX_RETRY_AFTER: Duration = Duration::from_secs(3600);

/// HTTP client settings shared by every connector type.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct HttpSettings {
    #[serde(default = "default_connect_timeout", with = "humantime_serde")]
    pub connect_timeout: Duration,
    #[serde(default = "default_request_timeout", with = "humantime_serde")]
    pub request_timeout: Duration,
    /// Extra PEM CA bundle to trust, on top of the built-in roots.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
    /// Skip TLS certificate verification. For labs only; logged at WARN on start.
    #[serde(default)]
    pub insecure_skip_verify: bool,
}

impl Default for HttpSettings {
    fn default() -> Self {
        Self {
            connect_timeout: default_connect_timeout(),
            request_timeout: default_request_timeout(),
            ca_file: None,
            insecure_skip_verify: false,
        }
    }
}

fn default_connect_timeout() -> Duration {
    Duration::from_secs(5)
}
fn default_request_timeout() -> Duration {
    Duration::from_secs(30)
}

/// Builds the client for one connector: timeouts, TLS roots, user agent.
pub fn build_client(name: &str, settings: &HttpSettings) -> Result<reqwest::Client, BuildError> {
    let mut builder = reqwest::Client::builder()
        .connect_timeout(settings.connect_timeout)
        .timeout(settings.request_timeout)
        .user_agent(concat!("provisioner/", env!("CARGO_PKG_VERSION")))
        .pool_idle_timeout(Duration::from_secs(60))
        .tcp_nodelay(true)
        // A provisioning API that redirects is misconfigured: a redirected POST would
        // turn into a GET, and credentials must not follow it to another address. The
        // 3xx is reported as the call's error instead.
        .redirect(reqwest::redirect::Policy::none())
        // Retries are ours (the connector's retry policy and its gate, which see every
        // attempt); reqwest's own would also keep a copy of every request to replay.
        .retry(reqwest::retry::never());
    if let Some(path) = &settings.ca_file {
        let pem = std::fs::read(path).map_err(|error| BuildError::Invalid {
            name: name.to_string(),
            message: format!("cannot read http.ca_file {}: {error}", path.display()),
        })?;
        let certificates = reqwest::Certificate::from_pem_bundle(&pem).map_err(|error| BuildError::Invalid {
            name: name.to_string(),
            message: format!("http.ca_file {} is not a PEM bundle: {error}", path.display()),
        })?;
        for certificate in certificates {
            builder = builder.add_root_certificate(certificate);
        }
    }
    if settings.insecure_skip_verify {
        tracing::warn!(
            connector = name,
            "TLS certificate verification is OFF for this connector (http.insecure_skip_verify)."
        );
        builder = builder.danger_accept_invalid_certs(true);
    }
    builder.build().map_err(|error| BuildError::Invalid {
        name: name.to_string(),
        message: format!("cannot build the HTTP client: {error}"),
    })
}

/// A transport-level failure (no HTTP status).
pub fn transport_error(error: reqwest::Error) -> ConnectorError {
    if error.is_timeout() {
        ConnectorError::Timeout
    } else {
        // The URL can carry query values (filters with user names); keep it out.
        ConnectorError::Transport {
            message: error.without_url().to_string(),
        }
    }
}

/// The default classification of an HTTP error status, with the target's message.
/// Connectors refine it where their API differs (Google's 403 rate limits, …).
pub fn status_error(status: StatusCode, headers: &HeaderMap, message: String) -> ConnectorError {
    let code = status.as_u16();
    let retry_after = retry_after(headers);
    match status {
        StatusCode::TOO_MANY_REQUESTS => ConnectorError::Throttled {
            status: Some(code),
            message,
            retry_after,
        },
        StatusCode::REQUEST_TIMEOUT => ConnectorError::Server {
            status: code,
            message,
            retry_after,
        },
        StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => ConnectorError::Auth {
            status: Some(code),
            message,
        },
        StatusCode::NOT_IMPLEMENTED => ConnectorError::Rejected { status: code, message },
        status if status.is_server_error() => ConnectorError::Server {
            status: code,
            message,
            retry_after,
        },
        _ => ConnectorError::Rejected { status: code, message },
    }
}

/// `Retry-After` as delta-seconds or an HTTP date.
pub fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let value = headers.get(reqwest::header::RETRY_AFTER)?.to_str().ok()?.trim();
    let delay = match value.parse::<u64>() {
        Ok(seconds) => Duration::from_secs(seconds),
        Err(_) => {
            let date = httpdate(value)?;
            date.signed_duration_since(chrono::Utc::now())
                .to_std()
                .unwrap_or(Duration::ZERO)
        }
    };
    Some(delay.min(MAX_RETRY_AFTER))
}

fn httpdate(value: &str) -> Option<chrono::DateTime<chrono::Utc>> {
    chrono::DateTime::parse_from_rfc2822(value)
        .ok()
        .map(|date| date.with_timezone(&chrono::Utc))
}

/// The JSON body of a successful response; `Null` when it is empty (204).
pub async fn json_body(response: reqwest::Response) -> Result<serde_json::Value, ConnectorError> {
    let status = response.status();
    let bytes = response.bytes().await.map_err(transport_error)?;
    if bytes.is_empty() {
        return Ok(serde_json::Value::Null);
    }
    serde_json::from_slice(&bytes).map_err(|error| ConnectorError::InvalidResponse {
        status: Some(status.as_u16()),
        message: format!("not JSON: {error}"),
    })
}

/// Reads a response body for an error message, bounded so a huge error page cannot
/// blow up memory or logs.
pub async fn error_body(response: reqwest::Response) -> String {
    const LIMIT: usize = 2048;
    match response.text().await {
        Ok(text) if text.len() > LIMIT => {
            let mut end = LIMIT;
            while !text.is_char_boundary(end) {
                end -= 1;
            }
            format!("{}…", &text[..end])
        }
        Ok(text) => text,
        Err(error) => format!("(unreadable body: {})", error.without_url()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use reqwest::header::{HeaderValue, RETRY_AFTER};

    fn headers(value: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(RETRY_AFTER, HeaderValue::from_str(value).unwrap());
        headers
    }

    #[test]
    fn retry_after_reads_seconds_and_dates() {
        assert_eq!(retry_after(&headers("7")), Some(Duration::from_secs(7)));
        let in_a_minute = (chrono::Utc::now() + chrono::Duration::seconds(60)).to_rfc2822();
        let delay = retry_after(&headers(&in_a_minute)).unwrap();
        assert!(
            delay > Duration::from_secs(50) && delay <= Duration::from_secs(60),
            "{delay:?}"
        );
        assert_eq!(retry_after(&headers("soon")), None);
        assert_eq!(retry_after(&headers("999999")), Some(MAX_RETRY_AFTER));
    }

    #[test]
    fn statuses_are_classified() {
        let empty = HeaderMap::new();
        let retryable =
            |code: u16| status_error(StatusCode::from_u16(code).unwrap(), &empty, String::new()).is_retryable();
        for code in [408, 429, 500, 502, 503, 504] {
            assert!(retryable(code), "{code} should be retried");
        }
        for code in [400, 401, 403, 404, 409, 412, 501] {
            assert!(!retryable(code), "{code} should not be retried");
        }
    }
}
