//! Path globs.
