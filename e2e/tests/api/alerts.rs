//! SPEC §5.11 (alerts) against the real gateway, worker and services.
