//! Custos response transform.
#![forbid(unsafe_code)]
