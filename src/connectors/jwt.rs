//! RS256 JSON Web Tokens for OAuth 2.0 JWT-bearer grants (RFC 7523): signing for the
//! Google and Salesforce connectors, verification for their emulators.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use openssl::hash::MessageDigest;
use openssl::pkey::{PKey, Private, Public};
use openssl::rsa::Rsa;
use openssl::sign::{Signer, Verifier};
use serde_json::Value;

/// A private key that signs assertions. Its `Debug` never shows the key.
pub struct RsaSigner {
    key: PKey<Private>,
}

impl std::fmt::Debug for RsaSigner {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str("RsaSigner([redacted])")
    }
}

impl RsaSigner {
    /// From a PEM private key (PKCS#8 `BEGIN PRIVATE KEY` or PKCS#1 `BEGIN RSA PRIVATE KEY`).
    /// The error never quotes the key.
    pub fn from_pem(pem: &str) -> Result<RsaSigner, String> {
        let key = PKey::private_key_from_pem(pem.as_bytes()).map_err(|_| "not a PEM RSA private key".to_string())?;
        if key.rsa().is_err() {
            return Err("the private key is not an RSA key".into());
        }
        Ok(RsaSigner { key })
    }

    /// A fresh 2048-bit key, for emulators, demos and tests.
    pub fn generate() -> RsaSigner {
        let rsa = Rsa::generate(2048).expect("OpenSSL generates RSA keys");
        RsaSigner {
            key: PKey::from_rsa(rsa).expect("an RSA key is a PKey"),
        }
    }

    pub fn private_key_pem(&self) -> String {
        String::from_utf8(self.key.private_key_to_pem_pkcs8().expect("PKCS#8 encoding")).expect("PEM is ASCII")
    }

    pub fn public_key(&self) -> PKey<Public> {
        let der = self.key.public_key_to_der().expect("public key encoding");
        PKey::public_key_from_der(&der).expect("a public key we just encoded")
    }

    /// `header.claims.signature`, RS256.
    pub fn sign(&self, claims: &Value) -> Result<String, String> {
        let header = URL_SAFE_NO_PAD.encode(br#"{"alg":"RS256","typ":"JWT"}"#);
        let payload = URL_SAFE_NO_PAD.encode(serde_json::to_vec(claims).map_err(|error| error.to_string())?);
        let signing_input = format!("{header}.{payload}");
        let mut signer = Signer::new(MessageDigest::sha256(), &self.key).map_err(|error| error.to_string())?;
        signer
            .update(signing_input.as_bytes())
            .map_err(|error| error.to_string())?;
        let signature = signer.sign_to_vec().map_err(|error| error.to_string())?;
        Ok(format!("{signing_input}.{}", URL_SAFE_NO_PAD.encode(signature)))
    }
}

/// Verifies an RS256 JWT's signature and returns its claims. Checking the claims'
/// meaning (issuer, audience, expiry) is the caller's job.
pub fn verify(token: &str, public_key: &PKey<Public>) -> Result<Value, String> {
    let mut parts = token.split('.');
    let (Some(header), Some(payload), Some(signature), None) = (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err("not a three-part JWT".into());
    };
    let header: Value = serde_json::from_slice(&URL_SAFE_NO_PAD.decode(header).map_err(|_| "bad header encoding")?)
        .map_err(|_| "bad header JSON")?;
    if header.get("alg").and_then(Value::as_str) != Some("RS256") {
        return Err("alg must be RS256".into());
    }
    let signature = URL_SAFE_NO_PAD
        .decode(signature)
        .map_err(|_| "bad signature encoding")?;
    let mut verifier = Verifier::new(MessageDigest::sha256(), public_key).map_err(|error| error.to_string())?;
    verifier
        .update(format!("{}.{payload}", token.split('.').next().unwrap_or_default()).as_bytes())
        .map_err(|error| error.to_string())?;
    if !verifier.verify(&signature).map_err(|error| error.to_string())? {
        return Err("signature does not verify".into());
    }
    serde_json::from_slice(&URL_SAFE_NO_PAD.decode(payload).map_err(|_| "bad payload encoding")?)
        .map_err(|_| "bad payload JSON".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signed_tokens_verify_and_tampered_ones_do_not() {
        let signer = RsaSigner::generate();
        let token = signer.sign(&serde_json::json!({"iss": "a", "exp": 1})).unwrap();
        assert_eq!(verify(&token, &signer.public_key()).unwrap()["iss"], "a");
        let other = RsaSigner::generate();
        assert!(verify(&token, &other.public_key()).is_err(), "wrong key");
        let mut parts: Vec<&str> = token.split('.').collect();
        let forged = URL_SAFE_NO_PAD.encode(br#"{"iss":"b","exp":1}"#);
        parts[1] = &forged;
        assert!(
            verify(&parts.join("."), &signer.public_key()).is_err(),
            "tampered claims"
        );
        let reparsed = RsaSigner::from_pem(&signer.private_key_pem()).unwrap();
        assert!(verify(&reparsed.sign(&serde_json::json!({})).unwrap(), &signer.public_key()).is_ok());
        assert!(RsaSigner::from_pem("not a key").is_err());
        assert!(!format!("{signer:?}").contains("PRIVATE"));
    }
}
