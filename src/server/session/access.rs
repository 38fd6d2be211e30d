//! The access token's word on each per-document request (protocol.md, "Access
//! tokens"): a refusal is the same whether the document exists or not, and an expired
//! token closes the connection.

use super::Session;
use crate::auth::{self, Access, Denied};
use crate::protocol::message::ErrorCode;
use crate::sequencer::Sequencer;

/// What the token says about one request.
pub(super) enum Permit {
    Granted,
    /// Refused with this code and message; the session goes on.
    Refused(ErrorCode, String),
    /// The token's time is over: the connection is being closed (code 12).
    Expired,
}

impl<S: Sequencer> Session<S> {
    /// Whether this session's token lets it do `need` to `doc` now. An expired token
    /// closes the connection here, so that the caller only stops.
    pub(super) fn permit(&self, doc: &str, need: Access) -> Permit {
        // A grant that never expires (a server without tokens) reads no clock per request.
        let now = match self.grant.expires_unix_secs {
            u64::MAX => 0,
            _ => auth::now_unix_secs(),
        };
        match self.grant.check(doc, need, now) {
            Ok(()) => Permit::Granted,
            Err(Denied::NotNamed) => Permit::Refused(
                ErrorCode::AccessDenied,
                format!("the access token does not grant document {doc:?}"),
            ),
            Err(Denied::ReadOnly) => Permit::Refused(
                ErrorCode::ReadOnly,
                format!("the access token grants document {doc:?} for reading only"),
            ),
            Err(Denied::Expired) => {
                self.close_expired();
                Permit::Expired
            }
        }
    }

    /// Refuses a request about `doc` that needs `need` unless the token allows it:
    /// `None` when it does, else whether the connection stays open (an `Error` with
    /// the request's id was sent, or the connection is closing with code 12).
    pub(super) fn refuse_unless(&self, rid: u32, doc: &str, need: Access) -> Option<bool> {
        match self.permit(doc, need) {
            Permit::Granted => None,
            Permit::Refused(code, message) => {
                self.send_error(rid, code, message);
                Some(true)
            }
            Permit::Expired => Some(false),
        }
    }

    /// Closes the connection with code 12: the token's time is over.
    pub(super) fn close_expired(&self) {
        self.outbox.close_with(
            ErrorCode::TokenExpired,
            format!(
                "the access token expired at {} (unix seconds)",
                self.grant.expires_unix_secs
            ),
        );
    }
}
