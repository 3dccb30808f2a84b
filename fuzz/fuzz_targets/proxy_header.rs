//! The first bytes of a connection on a `--proxy-protocol` listener: parsing them must never
//! panic, a header must end within the input and never past 107 bytes (v1) or the v2 bound, and
//! asking for the bytes the parser says it needs must reach the same answer as the whole input,
//! never reading past the header's end.
#![no_main]

use libfuzzer_sys::fuzz_target;
use wsgate::proxy::protocol::{self, Parsed, V1_MAX, V2_MAX};

fuzz_target!(|data: &[u8]| {
    let whole = protocol::parse(data);
    if let Ok(Parsed::Done { len, .. }) = whole {
        assert!(len <= data.len());
        assert!(len <= V1_MAX.max(V2_MAX));
    }
    // Fed as `read_header` feeds it: 5 bytes, then what each answer asks for.
    let mut have = 5.min(data.len());
    loop {
        match protocol::parse(&data[..have]) {
            Ok(Parsed::Need(n)) => {
                assert!(n > 0, "asked for nothing");
                if have + n > data.len() {
                    break;
                }
                have += n;
            }
            Ok(Parsed::Done { header, len }) => {
                assert_eq!(len, have, "a header ends where the reads stopped");
                assert_eq!(protocol::parse(&data[..len]), Ok(Parsed::Done { header, len }));
                break;
            }
            Err(_) => break,
        }
    }
});
