//! The handshake: `Hello`, answered with `Welcome` or an `Error` that closes.

use super::Session;
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
        if token != self.server.config.token {
            return refuse(self, ErrorCode::WrongToken, "wrong access token".into());
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
