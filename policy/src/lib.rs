//! Custos policy compiler and decision engine.
#![forbid(unsafe_code)]

pub mod glob;
pub mod normalize;
