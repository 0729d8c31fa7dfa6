//! One error type for the whole crate. Every message names what is at fault:
//! the file, the tensor, the row, and what was wrong with it.

use std::fmt;
use std::path::Path;

/// The crate's error: a human-readable message that already names the file,
/// tensor or row at fault. Constructed through the helpers below so that the
/// wording stays uniform.
#[derive(Debug, Clone, PartialEq)]
pub struct Error {
    msg: String,
}

/// Shorthand for `std::result::Result<T, beft::Error>`.
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// A free-form message (used where no file is involved, e.g. bad flags).
    pub fn msg(msg: impl Into<String>) -> Self {
        Error { msg: msg.into() }
    }

    /// A problem with one file: `"{path}: {msg}"`.
    pub fn file(path: &Path, msg: impl fmt::Display) -> Self {
        Error {
            msg: format!("{}: {}", path.display(), msg),
        }
    }

    /// A problem at one line of a text file: `"{path}:{line}: {msg}"` (1-based line).
    pub fn line(path: &Path, line: usize, msg: impl fmt::Display) -> Self {
        Error {
            msg: format!("{}:{}: {}", path.display(), line, msg),
        }
    }

    /// An I/O failure on `path`.
    pub fn io(path: &Path, err: std::io::Error) -> Self {
        Error::file(path, err)
    }

    /// Prefix the message with more context (outermost first).
    pub fn context(self, ctx: impl fmt::Display) -> Self {
        Error {
            msg: format!("{ctx}: {}", self.msg),
        }
    }

    /// The message.
    pub fn message(&self) -> &str {
        &self.msg
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.msg)
    }
}

impl std::error::Error for Error {}

/// `bail!("...")` returns `Err(Error::msg(format!(...)))`.
#[macro_export]
macro_rules! bail {
    ($($arg:tt)*) => { return Err($crate::error::Error::msg(format!($($arg)*))) };
}
