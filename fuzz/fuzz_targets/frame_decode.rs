//! Arbitrary bytes as a TCP stream into the frame codec, and as patches applied to a
//! text: never a panic; a decoded message re-encodes to the same frame.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use quire::protocol::frame::FrameCodec;
use quire::protocol::message::{Envelope, Message};
use quire::text::Text;
use tokio_util::codec::Decoder;

fuzz_target!(|data: &[u8]| {
    let mut codec = FrameCodec::new(4096);
    let mut buf = BytesMut::from(data);
    while let Ok(Some(env)) = codec.decode(&mut buf) {
        let again = Envelope::decode(&env.encode()).expect("re-encoded message decodes");
        assert_eq!(again, env);
        if let Message::Submit { patches, .. } = &env.message {
            let mut text = Text::from("start \u{1F600} text");
            let _ = text.apply(patches);
        }
    }
});
