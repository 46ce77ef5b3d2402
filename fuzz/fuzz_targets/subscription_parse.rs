#![no_main]
//! The WebSocket client → server message parser (`kappa_http::ws::parse_client_message`):
//! subscribe/unsubscribe JSON, the key-or-prefix rule, resume tokens, the size limit.
//! Never panics; an accepted message fits the limit and its resume token prints back to
//! itself; a refused one carries an error code.

use kappa_http::live::Token;
use kappa_http::ws::{ClientRequest, parse_client_message};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // Byte 0 picks the size limit (the default, or a small one so the limit check is hit
    // too); binary WebSocket messages reach the parser through the same lossy UTF-8 step.
    let Some((&pick, rest)) = data.split_first() else { return };
    let max_bytes = if pick & 1 == 0 { kappa_http::HttpConfig::default().ws_message_bytes_max } else { 64 };
    let text = String::from_utf8_lossy(rest);
    match parse_client_message::<Token>(&text, max_bytes) {
        Ok(request) => {
            assert!(text.len() <= max_bytes, "accepted {} bytes over a {max_bytes}-byte limit", text.len());
            if let ClientRequest::Subscribe { resume: Some(token), .. } = request {
                assert_eq!(token.to_string().parse::<Token>().ok(), Some(token), "resume token round trip");
            }
        }
        Err((_, error)) => assert!(!error.code.is_empty() && error.status.is_client_error(), "{error:?}"),
    }
});
