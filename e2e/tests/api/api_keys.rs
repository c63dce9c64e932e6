//! SPEC §5.11 (api_keys) against the real gateway, worker and services.
