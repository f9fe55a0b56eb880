//! Request context: values a middleware sets for the rest of its request (the handler, the
//! other middleware, the response hooks), on the worker thread that runs the request's
//! plugins, and forgets when the request is answered.

use std::cell::RefCell;

use plughost_plugin_api::HostError;

/// Most keys one request may hold.
const MAX_KEYS: usize = 64;
/// Most bytes (keys and values) one request may hold.
const MAX_BYTES: usize = 64 << 10;

/// One request's values, by key.
type Values = Vec<(String, Vec<u8>)>;

thread_local! {
    /// The context of the request whose plugins this thread runs now.
    static CONTEXT: RefCell<Option<Values>> = const { RefCell::new(None) };
}

/// While this lives, this thread runs one request's plugins, and they share a context.
#[derive(Debug)]
pub struct Scope(());

/// Opens an empty context for the request about to run on this thread.
pub fn open() -> Scope {
    CONTEXT.with(|c| *c.borrow_mut() = Some(Vec::new()));
    Scope(())
}

impl Drop for Scope {
    fn drop(&mut self) {
        let left = CONTEXT.with(|c| c.borrow_mut().take());
        drop(left);
    }
}

/// Sets `key` for the current request (see the module).
pub fn set(key: &str, value: &[u8]) -> Result<(), HostError> {
    CONTEXT.with(|c| {
        let mut c = c.try_borrow_mut().map_err(|_| HostError::NotEnabled)?;
        let values = c.as_mut().ok_or(HostError::NotEnabled)?;
        values.retain(|(k, _)| k != key);
        let used: usize = values.iter().map(|(k, v)| k.len() + v.len()).sum();
        if values.len() >= MAX_KEYS || used + key.len() + value.len() > MAX_BYTES {
            return Err(HostError::ValueTooLong);
        }
        values.push((key.to_owned(), value.to_vec()));
        Ok(())
    })
}

/// The value of `key` for the current request.
pub fn get(key: &str) -> Option<Vec<u8>> {
    CONTEXT.with(|c| {
        let c = c.try_borrow().ok()?;
        let values = c.as_ref()?;
        values
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.clone())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_live_for_one_request_within_bounds() {
        assert_eq!(set("a", b"1"), Err(HostError::NotEnabled));
        let scope = open();
        set("a", b"1").unwrap();
        set("a", b"2").unwrap();
        assert_eq!(get("a").as_deref(), Some(&b"2"[..]));
        assert_eq!(
            set("big", &vec![0; MAX_BYTES]),
            Err(HostError::ValueTooLong)
        );
        drop(scope);
        assert_eq!(get("a"), None);
    }
}
