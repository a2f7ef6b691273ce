//! The `herald` binary: parse the command line and hand over to the library.

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = herald::cli::parse();
    match herald::cli::run(cli).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            #[allow(clippy::print_stderr)] // The one place a fatal error is reported.
            {
                eprintln!("herald: {err:#}");
            }
            std::process::ExitCode::FAILURE
        }
    }
}
