//! HTTP/1.1 on our own connection loop ([`conn`]): the head parser ([`parse`]), request
//! bodies and the read buffer ([`body`]), response writing ([`write`]), deferred and streamed
//! responses ([`deferred`]), and the middleware onion over each worker's plugin instances
//! ([`pipeline`]).

pub mod body;
pub mod conn;
pub mod deferred;
pub mod parse;
pub mod pipeline;
pub mod write;

pub use conn::{serve, Site};
