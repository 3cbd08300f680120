//! OAuth 2.0 access tokens and the one authorised send every connector uses.
//!
//! - Tokens: fetched at a token endpoint ([`request_token`]; the RFC 7523 JWT-bearer
//!   grant Google and Salesforce share is [`request_jwt_bearer_token`]) and cached until
//!   shortly before they expire ([`TokenCache`]).
//! - [`send_authorised`]: get the token, send, renew the token once and send again if
//!   the target says the session expired, and classify a failed answer. What differs
//!   between targets (the success statuses, the session-expired signal, the error
//!   dialect) is a [`Target`].

use std::future::Future;
use std::time::{Duration, Instant};

use reqwest::header::HeaderMap;
use reqwest::{RequestBuilder, StatusCode};
use serde::Deserialize;

use crate::connectors::http::{error_body, status_error, transport_error};
use crate::connectors::jwt::RsaSigner;
use crate::connectors::ConnectorError;
use crate::secret::Secret;

/// Renew this long before the token expires, so a call never carries a dying token.
const RENEW_BEFORE_EXPIRY: Duration = Duration::from_secs(60);
/// RFC 7523 §2.1.
const JWT_BEARER_GRANT: &str = "urn:ietf:params:oauth:grant-type:jwt-bearer";
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

/// The RFC 7523 JWT-bearer grant: signs `claims` (RS256) and exchanges the assertion at
/// `token_url`. Google and Salesforce differ only in their claims.
pub async fn request_jwt_bearer_token(
    http: &reqwest::Client,
    token_url: &str,
    signer: &RsaSigner,
    claims: &serde_json::Value,
) -> Result<Token, ConnectorError> {
    let assertion = signer.sign(claims).map_err(|message| ConnectorError::Auth {
        status: None,
        message: format!("cannot sign the token request: {message}"),
    })?;
    request_token(
        http,
        token_url,
        &[("grant_type", JWT_BEARER_GRANT), ("assertion", assertion.as_str())],
        None,
    )
    .await
}

/// What differs between targets in [`send_authorised`].
pub trait Target {
    /// Whether `status` answers the request successfully.
    fn is_success(&self, status: StatusCode) -> bool {
        status.is_success()
    }

    /// Whether a failed answer says the token is no longer good, so that one renewal
    /// and resend may succeed. By default any 401.
    fn session_expired(&self, status: StatusCode, _body: &str) -> bool {
        status == StatusCode::UNAUTHORIZED
    }

    /// Told about every answer's headers (Salesforce reads its API usage from them).
    fn observe(&self, _headers: &HeaderMap) {}

    /// The error for a failed answer, in the target's own dialect.
    fn classify(&self, status: StatusCode, headers: &HeaderMap, body: &str) -> ConnectorError;
}

/// The one authorised send: gets the token from `token` (`None` when the target takes
/// no OAuth token), builds the request with `request` (called again for the resend; the
/// bearer header is added here), sends it, and when the target says the session expired
/// renews the token once and sends again. A successful answer is returned unread; a
/// failed one is classified by `target`.
pub async fn send_authorised<Fut>(
    tokens: &TokenCache,
    token: impl Fn() -> Fut,
    request: impl Fn(Option<&Token>) -> RequestBuilder,
    target: &impl Target,
) -> Result<reqwest::Response, ConnectorError>
where
    Fut: Future<Output = Result<Option<Token>, ConnectorError>>,
{
    let mut renewed = false;
    loop {
        let token = token().await?;
        let mut builder = request(token.as_ref());
        if let Some(token) = &token {
            builder = builder.bearer_auth(token.access_token.expose());
        }
        let response = builder.send().await.map_err(transport_error)?;
        target.observe(response.headers());
        let status = response.status();
        if target.is_success(status) {
            return Ok(response);
        }
        let headers = response.headers().clone();
        let body = error_body(response).await;
        if let Some(token) = &token {
            if !renewed && target.session_expired(status, &body) {
                // Revoked or expired early: forget it, fetch a fresh one, send again once.
                tokens.invalidate(token).await;
                renewed = true;
                continue;
            }
        }
        return Err(target.classify(status, &headers, &body));
    }
}
