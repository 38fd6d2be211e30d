//! `docs/demo.cast`, the recording of `quire demo` the README links, is a well-formed
//! asciinema v2 recording (a JSON header, then `[time, "o", text]` events in time
//! order, each line within the recorded width) of a demo that ended with its check
//! passed. `bash tools/record-demo.sh` makes it again.

use serde_json::Value;

#[test]
fn the_recorded_demo_is_an_asciinema_v2_file_of_a_passing_run() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/docs/demo.cast");
    let cast = std::fs::read_to_string(path).expect("docs/demo.cast (bash tools/record-demo.sh)");
    let mut lines = cast.lines();
    let header: Value = serde_json::from_str(lines.next().expect("a header")).unwrap();
    assert_eq!(header["version"], 2, "{header}");
    let width = header["width"].as_u64().expect("width") as usize;
    assert!(header["height"].as_u64().expect("height") > 0);
    assert!(header["timestamp"].as_u64().is_some(), "{header}");
    let mut last = 0.0;
    let mut output = String::new();
    for line in lines {
        let event: Value = serde_json::from_str(line).unwrap();
        let time = event[0].as_f64().expect("a time");
        assert!(time >= last, "events out of order at {line}");
        last = time;
        assert_eq!(event[1], "o", "{line}");
        output.push_str(event[2].as_str().expect("text"));
    }
    for shown in output.split("\r\n") {
        let plain = strip_colours(shown);
        assert!(
            plain.chars().count() <= width,
            "wider than {width}: {plain:?}"
        );
    }
    // At human pace (about 30 s), and it passed its check.
    assert!((15.0..=60.0).contains(&last), "{last} s");
    assert!(
        strip_colours(&output).contains("✓ Both texts equal the server's"),
        "the recorded run did not pass"
    );
}

fn strip_colours(s: &str) -> String {
    let mut out = String::new();
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            // CSI: ESC [ parameters, then a final letter.
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}
