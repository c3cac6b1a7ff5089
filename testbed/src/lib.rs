//! Test bed: real servers on loopback.
