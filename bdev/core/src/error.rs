//! Errors of the bdev layer, each mapping to a Linux errno for RPC replies.

/// What can go wrong creating, opening or using a bdev.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum BdevError {
    /// No bdev by that name.
    #[error("bdev '{0}' not found")]
    NotFound(String),
    /// Name (or alias) already taken.
    #[error("bdev name '{0}' already exists")]
    Exists(String),
    /// Claimed by a module.
    #[error("bdev '{name}' is claimed by module '{module}'")]
    Claimed {
        /// The bdev.
        name: String,
        /// Who holds the claim.
        module: String,
    },
    /// Still open by someone (cannot delete).
    #[error("bdev '{0}' is in use")]
    Busy(String),
    /// A bad parameter, with the reason.
    #[error("{0}")]
    Invalid(String),
    /// An OS error with context.
    #[error("{context}: {source_msg}")]
    Os {
        /// What was being done.
        context: String,
        /// strerror text.
        source_msg: String,
        /// The errno.
        errno: i32,
    },
    /// Operation not supported.
    #[error("{0}")]
    NotSupported(String),
    /// Should not happen.
    #[error("internal error: {0}")]
    Internal(String),
}

impl BdevError {
    /// Linux errno for this error (positive).
    pub fn errno(&self) -> i32 {
        match self {
            BdevError::NotFound(_) => libc::ENODEV,
            BdevError::Exists(_) => libc::EEXIST,
            BdevError::Claimed { .. } | BdevError::Busy(_) => libc::EBUSY,
            BdevError::Invalid(_) => libc::EINVAL,
            BdevError::Os { errno, .. } => *errno,
            BdevError::NotSupported(_) => libc::ENOTSUP,
            BdevError::Internal(_) => libc::EIO,
        }
    }

    /// Wraps an `std::io::Error` with what was being done.
    pub fn os(context: impl Into<String>, e: std::io::Error) -> BdevError {
        BdevError::Os {
            context: context.into(),
            errno: e.raw_os_error().unwrap_or(libc::EIO),
            source_msg: e.to_string(),
        }
    }
}
