//! SPEC §5.11 (pricing) against the real gateway, worker and services.
