//! Access tokens: what a client may do, per document, signed by the server's secret.
//!
//! Protocol-free: the session asks [`Keys::verify`] at the handshake and
//! [`Grant::check`] at each per-document request, and turns the answers into wire
//! codes. The format (protocol.md, "Access tokens") is
//!
//! ```text
//! token   = base64url(payload) "." base64url(HMAC-SHA256(secret, base64url(payload)))
//! payload = "1" LF scope LF access LF expires LF subject      (UTF-8, no trailing LF)
//! ```
//!
//! base64url is RFC 4648 §5 without padding. The MAC covers the *encoded* payload, the
//! exact ASCII bytes before the dot, so that a verifier never decodes what it has not
//! checked. `scope` is a document id, a prefix ending in `/*`, or `*`; `access` is `r`
//! or `rw`; `expires` is unix seconds in decimal (the token is valid while the time is
//! below it); `subject` names whom the token was issued to (0 ..= 100 bytes, for logs).

use std::fmt;
use std::net::SocketAddr;
use std::time::{SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use hmac::{Hmac, Mac};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// The payload format's version, its first line.
pub const TOKEN_VERSION: &str = "1";

/// The longest token accepted, in bytes (a scope and a subject of 100 bytes each make
/// one of about 360): anything longer is refused before it is decoded.
pub const MAX_TOKEN_BYTES: usize = 1024;

/// The longest subject, in bytes.
pub const MAX_SUBJECT_BYTES: usize = 100;

/// The shortest secret, in bytes: a short one could be guessed offline from one token.
pub const MIN_SECRET_BYTES: usize = 16;

/// Secrets held at once: the current one and the one it replaces.
pub const MAX_SECRETS: usize = 2;

/// What a token lets its holder do to the documents it names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Access {
    /// Open, fetch, receive, show presence.
    Read,
    /// All of that, and submit ops.
    Write,
}

/// Which documents a token names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    /// `*`: every document.
    All,
    /// `P/*`: every id that starts with `P/` (the string held, slash included).
    Prefix(String),
    /// One document id, exactly.
    Doc(String),
}

impl Scope {
    /// Parses `*`, `prefix/*` or a document id.
    pub fn parse(s: &str) -> Result<Scope, String> {
        if s == "*" {
            return Ok(Scope::All);
        }
        if let Some(prefix) = s.strip_suffix('*') {
            if !prefix.ends_with('/') || prefix.len() < 2 {
                return Err(format!(
                    "scope {s:?}: a wildcard must be `*` alone or end a prefix as `/*`"
                ));
            }
            crate::op::validate_doc_id(prefix).map_err(|e| format!("scope {s:?}: {e}"))?;
            return Ok(Scope::Prefix(prefix.to_owned()));
        }
        if s.contains('*') {
            return Err(format!("scope {s:?}: `*` may only end it, after a `/`"));
        }
        crate::op::validate_doc_id(s).map_err(|e| format!("scope {s:?}: {e}"))?;
        Ok(Scope::Doc(s.to_owned()))
    }

    /// Whether this scope names `doc`. `notes/*` names `notes/a`, never `notes-private`
    /// nor `notes` itself.
    pub fn names(&self, doc: &str) -> bool {
        match self {
            Scope::All => true,
            Scope::Prefix(p) => doc.len() > p.len() && doc.starts_with(p.as_str()),
            Scope::Doc(d) => d == doc,
        }
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Scope::All => f.write_str("*"),
            Scope::Prefix(p) => write!(f, "{p}*"),
            Scope::Doc(d) => f.write_str(d),
        }
    }
}

/// What a verified token grants.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    pub scope: Scope,
    pub access: Access,
    /// The token is valid while the time (unix seconds) is below this.
    pub expires_unix_secs: u64,
    /// Whom the token was issued to.
    pub subject: String,
}

/// Why a token was refused at the handshake.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenError {
    /// Not of the format (or empty where a token is required).
    Malformed(String),
    /// Its MAC matches none of the server's secrets: forged, altered, or signed with a
    /// secret the server no longer holds.
    BadSignature,
    /// Valid, but its time is over.
    Expired { expires_unix_secs: u64 },
}

impl fmt::Display for TokenError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TokenError::Malformed(why) => write!(f, "malformed access token: {why}"),
            TokenError::BadSignature => {
                f.write_str("the access token's signature matches none of the server's secrets")
            }
            TokenError::Expired { expires_unix_secs } => {
                write!(
                    f,
                    "the access token expired at {expires_unix_secs} (unix seconds)"
                )
            }
        }
    }
}

impl std::error::Error for TokenError {}

/// Why a per-document request was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Denied {
    /// The token does not name the document. Said the same way whether the document
    /// exists or not.
    NotNamed,
    /// The token names it for reading only, and the request writes.
    ReadOnly,
    /// The token's time is over.
    Expired,
}

impl Grant {
    /// What a client gets from a server without secrets: everything, for ever.
    pub fn anonymous() -> Grant {
        Grant {
            scope: Scope::All,
            access: Access::Write,
            expires_unix_secs: u64::MAX,
            subject: String::new(),
        }
    }

    /// Whether the holder may do `need` to `doc` at `now_unix_secs`. Expiry is checked
    /// first, then the document, then the access: a refusal never depends on anything
    /// but the token and the id asked for.
    pub fn check(&self, doc: &str, need: Access, now_unix_secs: u64) -> Result<(), Denied> {
        if now_unix_secs >= self.expires_unix_secs {
            return Err(Denied::Expired);
        }
        if !self.scope.names(doc) {
            return Err(Denied::NotNamed);
        }
        if need > self.access {
            return Err(Denied::ReadOnly);
        }
        Ok(())
    }

    /// The payload's text (the bytes that are base64url-encoded and signed).
    fn payload(&self) -> String {
        let access = match self.access {
            Access::Read => "r",
            Access::Write => "rw",
        };
        format!(
            "{TOKEN_VERSION}\n{}\n{access}\n{}\n{}",
            self.scope, self.expires_unix_secs, self.subject
        )
    }

    fn parse_payload(text: &str) -> Result<Grant, String> {
        let fields: Vec<&str> = text.split('\n').collect();
        let [version, scope, access, expires, subject] = fields[..] else {
            return Err(format!("{} payload lines, not 5", fields.len()));
        };
        if version != TOKEN_VERSION {
            return Err(format!("payload version {version:?}, not {TOKEN_VERSION}"));
        }
        let access = match access {
            "r" => Access::Read,
            "rw" => Access::Write,
            other => return Err(format!("access {other:?}, not \"r\" or \"rw\"")),
        };
        if expires.is_empty()
            || !expires.bytes().all(|b| b.is_ascii_digit())
            || (expires.len() > 1 && expires.starts_with('0'))
        {
            return Err(format!("expiry {expires:?} is not decimal unix seconds"));
        }
        let expires_unix_secs = expires
            .parse()
            .map_err(|_| format!("expiry {expires:?} is out of range"))?;
        validate_subject(subject)?;
        Ok(Grant {
            scope: Scope::parse(scope)?,
            access,
            expires_unix_secs,
            subject: subject.to_owned(),
        })
    }
}

/// A subject: at most [`MAX_SUBJECT_BYTES`], no control characters.
pub fn validate_subject(subject: &str) -> Result<(), String> {
    if subject.len() > MAX_SUBJECT_BYTES {
        return Err(format!(
            "subject of {} bytes; at most {MAX_SUBJECT_BYTES}",
            subject.len()
        ));
    }
    if subject.chars().any(char::is_control) {
        return Err("subject holds a control character".into());
    }
    Ok(())
}

/// Why a set of secrets was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyError {
    None,
    TooMany(usize),
    TooShort { index: usize, bytes: usize },
}

impl fmt::Display for KeyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KeyError::None => f.write_str("no secret given"),
            KeyError::TooMany(n) => write!(
                f,
                "{n} secrets given; at most {MAX_SECRETS} (the current one and the previous)"
            ),
            KeyError::TooShort { index, bytes } => write!(
                f,
                "secret {} has {bytes} bytes; at least {MIN_SECRET_BYTES}",
                index + 1
            ),
        }
    }
}

impl std::error::Error for KeyError {}

/// The server's secrets: the first signs, every one verifies (two during a rotation).
#[derive(Clone)]
pub struct Keys {
    secrets: Vec<Vec<u8>>,
}

impl fmt::Debug for Keys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never the secrets themselves.
        write!(f, "Keys({} secrets)", self.secrets.len())
    }
}

impl Keys {
    /// One or two secrets, each at least [`MIN_SECRET_BYTES`] long, current first.
    pub fn new<S: AsRef<[u8]>>(secrets: &[S]) -> Result<Keys, KeyError> {
        if secrets.is_empty() {
            return Err(KeyError::None);
        }
        if secrets.len() > MAX_SECRETS {
            return Err(KeyError::TooMany(secrets.len()));
        }
        for (index, s) in secrets.iter().enumerate() {
            let bytes = s.as_ref().len();
            if bytes < MIN_SECRET_BYTES {
                return Err(KeyError::TooShort { index, bytes });
            }
        }
        Ok(Keys {
            secrets: secrets.iter().map(|s| s.as_ref().to_vec()).collect(),
        })
    }

    fn mac(secret: &[u8]) -> HmacSha256 {
        HmacSha256::new_from_slice(secret).expect("HMAC takes a key of any length")
    }

    /// A token for `grant`, signed with the current (first) secret.
    pub fn mint(&self, grant: &Grant) -> String {
        let payload = URL_SAFE_NO_PAD.encode(grant.payload());
        let mut mac = Self::mac(&self.secrets[0]);
        mac.update(payload.as_bytes());
        let tag = URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes());
        format!("{payload}.{tag}")
    }

    /// The grant of `token` if one of the secrets signed it and it has not expired at
    /// `now_unix_secs`. The MAC is checked (in constant time) before the payload is
    /// decoded.
    pub fn verify(&self, token: &str, now_unix_secs: u64) -> Result<Grant, TokenError> {
        let malformed = |why: &str| Err(TokenError::Malformed(why.into()));
        if token.is_empty() {
            return malformed("this server requires an access token");
        }
        if token.len() > MAX_TOKEN_BYTES {
            return malformed("longer than 1024 bytes");
        }
        let Some((payload, tag)) = token.split_once('.') else {
            return malformed("no '.' between payload and signature");
        };
        let Ok(tag) = URL_SAFE_NO_PAD.decode(tag) else {
            return malformed("the signature is not base64url without padding");
        };
        let signed = self.secrets.iter().any(|secret| {
            let mut mac = Self::mac(secret);
            mac.update(payload.as_bytes());
            mac.verify_slice(&tag).is_ok()
        });
        if !signed {
            return Err(TokenError::BadSignature);
        }
        let Ok(bytes) = URL_SAFE_NO_PAD.decode(payload) else {
            return malformed("the payload is not base64url without padding");
        };
        let Ok(text) = String::from_utf8(bytes) else {
            return malformed("the payload is not UTF-8");
        };
        let grant = Grant::parse_payload(&text).map_err(TokenError::Malformed)?;
        if now_unix_secs >= grant.expires_unix_secs {
            return Err(TokenError::Expired {
                expires_unix_secs: grant.expires_unix_secs,
            });
        }
        Ok(grant)
    }
}

/// The time as unix seconds (0 if the clock is before 1970).
pub fn now_unix_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// How a server without secrets may run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Startup {
    /// Secrets are configured: every client needs a token.
    Tokens,
    /// No secret, a loopback address: anonymous clients, all of them from this machine.
    AnonymousLoopback,
    /// No secret on a reachable address, as asked with `--insecure`.
    AnonymousInsecure,
}

/// Whether a server listening on `listen` may start: without a secret only on a
/// loopback address, unless `insecure`.
pub fn startup(listen: SocketAddr, has_secret: bool, insecure: bool) -> Result<Startup, String> {
    if has_secret {
        Ok(Startup::Tokens)
    } else if listen.ip().is_loopback() {
        Ok(Startup::AnonymousLoopback)
    } else if insecure {
        Ok(Startup::AnonymousInsecure)
    } else {
        Err(format!(
            "refusing to serve {listen} without a secret: anyone who reaches it could read \
             and write every document. Give --secret or --secret-file (or QUIRE_SECRET), \
             listen on a loopback address, or pass --insecure"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = 1_800_000_000;
    const SECRET: &str = "0123456789abcdef-current";
    const OLD: &str = "0123456789abcdef-previous";

    fn grant(scope: &str, access: Access) -> Grant {
        Grant {
            scope: Scope::parse(scope).unwrap(),
            access,
            expires_unix_secs: NOW + 60,
            subject: "alice".into(),
        }
    }

    fn keys(secrets: &[&str]) -> Keys {
        Keys::new(secrets).unwrap()
    }

    #[test]
    fn a_minted_token_verifies_to_its_grant() {
        let g = grant("notes/*", Access::Write);
        let token = keys(&[SECRET]).mint(&g);
        assert_eq!(keys(&[SECRET]).verify(&token, NOW), Ok(g));
    }

    #[test]
    fn the_format_is_base64url_payload_dot_base64url_hmac_of_the_encoded_payload() {
        let g = grant("doc-1", Access::Read);
        let token = keys(&[SECRET]).mint(&g);
        let (payload, tag) = token.split_once('.').unwrap();
        assert_eq!(
            URL_SAFE_NO_PAD.decode(payload).unwrap(),
            format!("1\ndoc-1\nr\n{}\nalice", NOW + 60).as_bytes()
        );
        let mut mac = HmacSha256::new_from_slice(SECRET.as_bytes()).unwrap();
        mac.update(payload.as_bytes());
        assert_eq!(
            URL_SAFE_NO_PAD.decode(tag).unwrap(),
            mac.finalize().into_bytes().to_vec()
        );
    }

    /// The example in protocol.md ("Access tokens"), computed apart from this code.
    #[test]
    fn the_example_of_protocol_md_verifies_and_is_minted_byte_for_byte() {
        let example = "MQpub3Rlcy8qCnJ3CjIwMDAwMDAwMDAKYWxpY2U.\
                       Tlup7rzKKTLfXc7YheZCJXlwyRNjPoK1KNkWVPYAyj0";
        assert!(include_str!("../protocol.md").contains(example));
        let keys = keys(&["0123456789abcdef"]);
        let grant = Grant {
            scope: Scope::Prefix("notes/".into()),
            access: Access::Write,
            expires_unix_secs: 2_000_000_000,
            subject: "alice".into(),
        };
        assert_eq!(keys.verify(example, 1_999_999_999), Ok(grant.clone()));
        assert_eq!(keys.mint(&grant), example);
    }

    #[test]
    fn a_forged_token_is_refused() {
        let token = keys(&[SECRET]).mint(&grant("a", Access::Read));
        let (_, tag) = token.split_once('.').unwrap();
        // The payload changed to grant writing to everything, the signature kept.
        let forged_payload = URL_SAFE_NO_PAD.encode(format!("1\n*\nrw\n{}\nalice", NOW + 60));
        let forged = format!("{forged_payload}.{tag}");
        assert_eq!(
            keys(&[SECRET]).verify(&forged, NOW),
            Err(TokenError::BadSignature)
        );
        // Signed with another secret.
        let other = keys(&["another-secret-of-16+"]).mint(&grant("a", Access::Read));
        assert_eq!(
            keys(&[SECRET]).verify(&other, NOW),
            Err(TokenError::BadSignature)
        );
        // One bit of the signature flipped.
        let mut bytes = token.into_bytes();
        let last = bytes.len() - 2;
        bytes[last] = if bytes[last] == b'A' { b'B' } else { b'A' };
        let flipped = String::from_utf8(bytes).unwrap();
        assert_eq!(
            keys(&[SECRET]).verify(&flipped, NOW),
            Err(TokenError::BadSignature)
        );
    }

    #[test]
    fn an_expired_token_is_refused_from_its_expiry_second_on() {
        let g = grant("a", Access::Write);
        let token = keys(&[SECRET]).mint(&g);
        assert!(keys(&[SECRET]).verify(&token, NOW + 59).is_ok());
        for now in [NOW + 60, NOW + 3600] {
            assert_eq!(
                keys(&[SECRET]).verify(&token, now),
                Err(TokenError::Expired {
                    expires_unix_secs: NOW + 60
                })
            );
        }
        assert_eq!(g.check("a", Access::Read, NOW + 60), Err(Denied::Expired));
    }

    #[test]
    fn a_prefix_names_ids_below_it_and_nothing_beside_it() {
        let g = grant("notes/*", Access::Write);
        assert_eq!(g.check("notes/a", Access::Write, NOW), Ok(()));
        assert_eq!(g.check("notes/a/b", Access::Write, NOW), Ok(()));
        for other in ["notes-private", "notes", "notes/", "note/a", "xnotes/a"] {
            assert_eq!(
                g.check(other, Access::Read, NOW),
                Err(Denied::NotNamed),
                "{other}"
            );
        }
        let one = grant("notes", Access::Write);
        assert_eq!(one.check("notes", Access::Write, NOW), Ok(()));
        assert_eq!(
            one.check("notes/a", Access::Write, NOW),
            Err(Denied::NotNamed)
        );
        let all = grant("*", Access::Read);
        assert_eq!(all.check("anything", Access::Read, NOW), Ok(()));
    }

    #[test]
    fn a_read_token_cannot_write() {
        let g = grant("a", Access::Read);
        assert_eq!(g.check("a", Access::Read, NOW), Ok(()));
        assert_eq!(g.check("a", Access::Write, NOW), Err(Denied::ReadOnly));
    }

    #[test]
    fn a_rotated_secret_verifies_while_held_second_and_not_after() {
        let old_token = keys(&[OLD]).mint(&grant("a", Access::Write));
        let rotating = keys(&[SECRET, OLD]);
        assert!(rotating.verify(&old_token, NOW).is_ok());
        // New tokens are signed with the current secret.
        let new_token = rotating.mint(&grant("a", Access::Write));
        assert!(keys(&[SECRET]).verify(&new_token, NOW).is_ok());
        assert_eq!(
            keys(&[SECRET]).verify(&old_token, NOW),
            Err(TokenError::BadSignature)
        );
    }

    #[test]
    fn malformed_tokens_are_refused_with_a_reason() {
        let k = keys(&[SECRET]);
        let sign = |payload: &str| {
            let p = URL_SAFE_NO_PAD.encode(payload);
            let mut mac = HmacSha256::new_from_slice(SECRET.as_bytes()).unwrap();
            mac.update(p.as_bytes());
            format!(
                "{p}.{}",
                URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes())
            )
        };
        let long = "x".repeat(MAX_TOKEN_BYTES + 1);
        let bad = [
            String::new(),
            "no-dot".into(),
            "a.b.c".into(),
            "abc.!!!".into(),
            long,
            sign("1\na\nrw\n99999999999"),
            sign(&format!("2\na\nrw\n{}\ns", NOW + 60)),
            sign(&format!("1\na\nw\n{}\ns", NOW + 60)),
            sign("1\na\nrw\n+5\ns"),
            sign("1\na\nrw\n0100\ns"),
            sign("1\na\nrw\n99999999999999999999999\ns"),
            sign(&format!("1\nnotes*\nrw\n{}\ns", NOW + 60)),
            sign(&format!("1\n/*\nrw\n{}\ns", NOW + 60)),
            sign(&format!("1\na*b\nrw\n{}\ns", NOW + 60)),
            sign(&format!("1\n\nrw\n{}\ns", NOW + 60)),
            sign(&format!("1\na\nrw\n{}\ns\textra", NOW + 60)),
            sign(&format!("1\na\nrw\n{}\ns\n", NOW + 60)),
        ];
        for token in &bad {
            assert!(
                matches!(
                    k.verify(token, NOW),
                    Err(TokenError::Malformed(_) | TokenError::BadSignature)
                ),
                "{token:?}: {:?}",
                k.verify(token, NOW)
            );
        }
        // Those that are signed are malformed, not forged.
        for token in &bad[5..] {
            assert!(
                matches!(k.verify(token, NOW), Err(TokenError::Malformed(_))),
                "{token:?}"
            );
        }
        // Payload bytes that are not UTF-8, signed.
        let p = URL_SAFE_NO_PAD.encode([0xff, 0xfe]);
        let mut mac = HmacSha256::new_from_slice(SECRET.as_bytes()).unwrap();
        mac.update(p.as_bytes());
        let token = format!(
            "{p}.{}",
            URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes())
        );
        assert!(matches!(
            k.verify(&token, NOW),
            Err(TokenError::Malformed(_))
        ));
    }

    #[test]
    fn secrets_are_one_or_two_of_at_least_16_bytes() {
        assert_eq!(Keys::new::<&str>(&[]).unwrap_err(), KeyError::None);
        assert_eq!(
            Keys::new(&[SECRET, OLD, "third-secret-xxxxxx"]).unwrap_err(),
            KeyError::TooMany(3)
        );
        assert_eq!(
            Keys::new(&[SECRET, "short"]).unwrap_err(),
            KeyError::TooShort { index: 1, bytes: 5 }
        );
        assert!(!format!("{:?}", keys(&[SECRET])).contains(SECRET));
    }

    #[test]
    fn without_a_secret_only_loopback_serves_unless_insecure() {
        let at = |s: &str| s.parse::<SocketAddr>().unwrap();
        assert_eq!(
            startup(at("127.0.0.1:0"), false, false),
            Ok(Startup::AnonymousLoopback)
        );
        assert_eq!(
            startup(at("[::1]:7420"), false, false),
            Ok(Startup::AnonymousLoopback)
        );
        assert!(startup(at("0.0.0.0:0"), false, false).is_err());
        assert!(startup(at("192.168.1.5:7420"), false, false).is_err());
        assert_eq!(
            startup(at("0.0.0.0:0"), false, true),
            Ok(Startup::AnonymousInsecure)
        );
        assert_eq!(startup(at("0.0.0.0:0"), true, false), Ok(Startup::Tokens));
    }
}
