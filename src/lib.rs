//! sqlite-sim: a QMP-native QEMU VM supervisor.
//!
//! Requests (a VM name, a shell script, a timeout) arrive over REST and are stored in SQLite.
//! Agents claim them, boot a throwaway QEMU guest driven through QMP, type the script into the
//! guest's serial console, record every console byte, and always shut the guest down.
//!
//! The binary (`src/main.rs`) is a thin shell over [`cli::run`].

pub mod agent;
pub mod api;
pub mod auth;
pub mod cli;
pub mod config;
pub mod model;
pub mod qemu;
pub mod store;
pub mod tarball;
pub mod telemetry;
pub mod timefmt;
pub mod ui;
pub mod webhooks;
