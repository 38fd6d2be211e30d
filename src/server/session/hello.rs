//! The handshake: `Hello`, answered with `Welcome` or an `Error` that closes. The
//! access token is verified here (forged, malformed: code 7; expired: code 12).

use super::Session;
use crate::auth::{self, TokenError};
use crate::protocol::message::{Envelope, ErrorCode, Message};
use crate::protocol::PROTOCOL_VERSION;
use crate::sequencer::Sequencer;

impl<S: Sequencer> Session<S> {
    pub(super) async fn hello(&mut self, env: Envelope) -> bool {
        let refuse = |s: &Self, code, message: String| {
            s.send_error(0, code, message);
            false
        };
        let Message::Hello {
            version,
            client_id,
            token,
        } = env.message
        else {
            return refuse(
                self,
                ErrorCode::HandshakeRequired,
                "the first message must be Hello".into(),
            );
        };
        if version != PROTOCOL_VERSION {
            return refuse(
                self,
                ErrorCode::UnsupportedVersion,
                format!("protocol version {version} is not supported; this server speaks {PROTOCOL_VERSION}"),
            );
        }
        // Without secrets every client is anonymous (a token, if any, means nothing).
        if let Some(keys) = &self.server.config.keys {
            match keys.verify(&token, auth::now_unix_secs()) {
                Ok(grant) => {
                    tracing::debug!(
                        session = self.outbox.session,
                        subject = grant.subject,
                        scope = %grant.scope,
                        access = ?grant.access,
                        "access token accepted"
                    );
                    self.grant = grant;
                }
                Err(e) => {
                    let code = match e {
                        TokenError::Expired { .. } => ErrorCode::TokenExpired,
                        TokenError::Malformed(_) | TokenError::BadSignature => {
                            ErrorCode::InvalidToken
                        }
                    };
                    return refuse(self, code, e.to_string());
                }
            }
        }
        let client_id = if client_id == 0 {
            // A client with no identity yet: one never given before (a file write now
            // and then, off the async workers).
            let sequencer = self.server.sequencer.clone();
            match self
                .server
                .blocking(move || sequencer.assign_client_id())
                .await
            {
                Ok(Ok(id)) => id,
                Ok(Err(e)) => {
                    return refuse(self, ErrorCode::StorageFailed, format!("{e}"));
                }
                Err(panic) => {
                    return refuse(
                        self,
                        ErrorCode::StorageFailed,
                        format!("giving out a client id failed: {panic}"),
                    );
                }
            }
        } else {
            client_id
        };
        self.client_id = Some(client_id);
        self.outbox = self.outbox.with_client(client_id);
        self.server.claim_client_id(&self.outbox);
        self.send(
            env.request_id,
            Message::Welcome {
                version: PROTOCOL_VERSION,
                max_frame: self.max_frame() as u32,
                client_id,
            },
        );
        true
    }
}
