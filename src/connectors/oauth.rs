//! OAuth 2.0 access tokens: fetching at a token endpoint, and caching them until
//! shortly before they expire. Shared by the SCIM (client credentials), Google (JWT
//! bearer) and Salesforce (three grants) connectors.

use std::time::{Duration, Instant};

use serde::Deserialize;

use crate::connectors::http::{error_body, status_error, transport_error};
use crate::connectors::ConnectorError;
use crate::secret::Secret;

/// Renew this long before the token expires, so a call never carries a dying token.
const RENEW_BEFORE_EXPIRY: Duration = Duration::from_secs(60);
/// When the server does not say, assume tokens last this long.
const DEFAULT_LIFETIME: Duration = Duration::from_secs(15 * 60);

#[derive(Clone)]
pub struct Token {
    pub access_token: Secret,
    /// Salesforce: the API host to use with this token.
    pub instance_url: Option<String>,
    renew_at: Instant,
}

/// The token endpoint's answer (RFC 6749 §5.1, plus Salesforce's `instance_url`).
#[derive(Deserialize)]
struct TokenResponse {
    access_token: String,
    #[serde(default)]
    expires_in: Option<u64>,
    #[serde(default)]
    instance_url: Option<String>,
}

/// RFC 6749 §5.2 error body.
#[derive(Deserialize)]
struct TokenErrorResponse {
    error: String,
    #[serde(default)]
    error_description: Option<String>,
}

/// One cached token. The async mutex makes concurrent callers wait for a single fetch
/// instead of stampeding the token endpoint.
#[derive(Default)]
pub struct TokenCache {
    cached: tokio::sync::Mutex<Option<Token>>,
}

impl TokenCache {
    /// The cached token, or a fresh one from `fetch` when there is none or it is due.
    pub async fn get<F, Fut>(&self, fetch: F) -> Result<Token, ConnectorError>
    where
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = Result<Token, ConnectorError>>,
    {
        let mut cached = self.cached.lock().await;
        if let Some(token) = cached.as_ref() {
            if Instant::now() < token.renew_at {
                return Ok(token.clone());
            }
        }
        let token = fetch().await?;
        *cached = Some(token.clone());
        Ok(token)
    }

    /// Forgets `used` after the target refused it (401), unless another caller has
    /// already replaced it.
    pub async fn invalidate(&self, used: &Token) {
        let mut cached = self.cached.lock().await;
        if cached
            .as_ref()
            .is_some_and(|token| token.access_token == used.access_token)
        {
            *cached = None;
        }
    }
}

/// POSTs a token request form, optionally with HTTP Basic client authentication.
pub async fn request_token(
    http: &reqwest::Client,
    token_url: &str,
    form: &[(&str, &str)],
    basic_auth: Option<(&str, &Secret)>,
) -> Result<Token, ConnectorError> {
    let mut request = http.post(token_url).form(form);
    if let Some((client_id, client_secret)) = basic_auth {
        request = request.basic_auth(client_id, Some(client_secret.expose()));
    }
    let response = request.send().await.map_err(transport_error)?;
    let status = response.status();
    if !status.is_success() {
        let headers = response.headers().clone();
        let body = error_body(response).await;
        let message = match serde_json::from_str::<TokenErrorResponse>(&body) {
            Ok(error) => format!(
                "token endpoint: {}{}",
                error.error,
                error
                    .error_description
                    .map(|description| format!(" ({description})"))
                    .unwrap_or_default()
            ),
            Err(_) => format!("token endpoint answered HTTP {}", status.as_u16()),
        };
        return Err(match status_error(status, &headers, message) {
            // A refused grant is a credentials problem, whatever 4xx carried it.
            ConnectorError::Rejected { status, message } => ConnectorError::Auth {
                status: Some(status),
                message,
            },
            other => other,
        });
    }
    let parsed: TokenResponse = response.json().await.map_err(|error| ConnectorError::InvalidResponse {
        status: Some(status.as_u16()),
        message: format!("token endpoint: {}", error.without_url()),
    })?;
    let lifetime = parsed.expires_in.map(Duration::from_secs).unwrap_or(DEFAULT_LIFETIME);
    // Short-lived tokens renew at 90% of their life rather than never being cached.
    let renew_in = lifetime
        .checked_sub(RENEW_BEFORE_EXPIRY)
        .filter(|renew_in| !renew_in.is_zero())
        .unwrap_or(lifetime.mul_f32(0.9));
    Ok(Token {
        access_token: Secret::new(parsed.access_token),
        instance_url: parsed.instance_url,
        renew_at: Instant::now() + renew_in,
    })
}
