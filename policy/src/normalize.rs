//! Request path normalisation.
