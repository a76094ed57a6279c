//! Custos end-to-end scenarios: the tests in `tests/` run against a real cluster with Custos
//! installed (`make e2e`); see the README. This library is empty.
#![forbid(unsafe_code)]
