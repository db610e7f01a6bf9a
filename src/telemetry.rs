//! Tracing set-up: `SQLITE_SIM_LOG_LEVEL` (or `RUST_LOG`) to stderr, or to `SQLITE_SIM_LOG_FILE`.

use crate::config::Settings;
use tracing_subscriber::EnvFilter;

pub fn init(settings: &Settings) -> anyhow::Result<()> {
    let level = match settings.log_level.to_ascii_uppercase().as_str() {
        "WARNING" => "warn".to_string(),
        other => other.to_ascii_lowercase(),
    };
    let filter = EnvFilter::try_from_default_env()
        // tokio-postgres logs every statement at DEBUG: the store's own lines say enough.
        .unwrap_or_else(|_| {
            EnvFilter::new(format!(
                "{level},tower_http=info,tokio_postgres=info,deadpool=info"
            ))
        });
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    match &settings.log_file {
        Some(path) => {
            if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                std::fs::create_dir_all(dir)?;
            }
            let file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)?;
            builder
                .with_ansi(false)
                .with_writer(std::sync::Mutex::new(file))
                .try_init()
                .map_err(|e| anyhow::anyhow!(e))?;
        }
        None => builder
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .with_writer(std::io::stderr)
            .try_init()
            .map_err(|e| anyhow::anyhow!(e))?,
    }
    Ok(())
}
