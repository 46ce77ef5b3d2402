//! Health of one log directory. After a failed fsync, or a failed write, the directory is
//! *poisoned*: the kernel may have dropped the dirty pages, so retrying the fsync and then
//! acknowledging could acknowledge lost data. Every later append fails until restart.
//!
//! One exception: a segment write refused for lack of space (ENOSPC, EDQUOT) loses
//! nothing the kernel had accepted. The partition cuts off the partial write and reports
//! the error without poisoning, so appends resume once space is freed. (An fsync that
//! reports ENOSPC still poisons, as does a full disk while rolling a segment.)

use std::path::PathBuf;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::error::{LogError, Result};

#[derive(Debug)]
pub struct DirHealth {
    dir: PathBuf,
    poisoned: AtomicBool,
    cause: Mutex<Option<String>>,
}

impl DirHealth {
    pub fn new(dir: PathBuf) -> Self {
        Self { dir, poisoned: AtomicBool::new(false), cause: Mutex::new(None) }
    }

    /// Fails with [`LogError::Poisoned`] once any write to the directory has failed.
    pub fn check(&self) -> Result<()> {
        if !self.poisoned.load(Ordering::Acquire) {
            return Ok(());
        }
        let cause = self.cause.lock().unwrap_or_else(|e| e.into_inner()).clone().unwrap_or_default();
        Err(LogError::Poisoned { dir: self.dir.clone(), cause })
    }

    /// Records the first failure; later ones keep the first cause.
    pub fn poison(&self, cause: &dyn std::fmt::Display) {
        let mut slot = self.cause.lock().unwrap_or_else(|e| e.into_inner());
        if slot.is_none() {
            tracing::error!(dir = %self.dir.display(), %cause, "log directory poisoned: no more appends until restart");
            *slot = Some(cause.to_string());
        }
        self.poisoned.store(true, Ordering::Release);
    }

    pub fn is_poisoned(&self) -> bool {
        self.poisoned.load(Ordering::Acquire)
    }
}
