//! Helpers shared by the tests that watch real processes.

#![allow(dead_code)]

use std::time::Duration;

/// True while `pid` exists and is not a zombie.
pub fn running(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => false,
        Ok(stat) => stat
            .rsplit(')')
            .next()
            .and_then(|rest| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X"),
    }
}

/// Wait up to 5 s for `pid` to be gone; whether it went.
pub async fn gone(pid: u32) -> bool {
    for _ in 0..50 {
        if !running(pid) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}
