//! The tcpfwd binary: parse, set up logging, run, map errors to exit codes.

use std::process::ExitCode;

use clap::CommandFactory;
use tcpfwd::clientca;
use tcpfwd::config::cli::{Cli, ClientCertCommand, Command, StateArgs, StatusArgs};
use tcpfwd::config::{file, layer, Config};
use tcpfwd::net::activation;
use tcpfwd::service::{control, logging, notify, shutdown};
use tcpfwd::{app, tls};

/// Bad arguments, configuration, certificates or keys: the user must change something.
const EXIT_USAGE: u8 = 2;
/// Anything else that stops start-up.
const EXIT_FAILURE: u8 = 1;

fn main() -> ExitCode {
    let cli = Cli::parse_or_exit();
    if let Some(Command::ClientCert(cmd)) = &cli.command {
        return match client_cert(cmd) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("tcpfwd: error: {e:#}");
                ExitCode::from(EXIT_FAILURE)
            }
        };
    }
    if let Some(Command::Status(a)) = &cli.command {
        return status(a);
    }
    let args = cli.args();
    let cli_layer = match args.to_layer() {
        Ok(l) => l,
        Err(msg) => Cli::command()
            .error(clap::error::ErrorKind::ArgumentConflict, msg)
            .exit(),
    };
    // A file's errors name the file, line and column: they are not about
    // the command line, so they do not take clap's usage form.
    let file_layer = match &args.config {
        None => None,
        Some(path) => match file::load(path) {
            Ok(l) => Some(l),
            Err(msg) => {
                eprintln!("tcpfwd: error: {msg}");
                return ExitCode::from(EXIT_USAGE);
            }
        },
    };
    let from_file = file_layer.is_some();
    let config: Config = match layer::build(file_layer, cli_layer.clone()) {
        Ok(c) => c,
        Err(msg) if from_file => {
            eprintln!("tcpfwd: error: {msg}");
            return ExitCode::from(EXIT_USAGE);
        }
        Err(msg) => Cli::command()
            .error(clap::error::ErrorKind::ArgumentConflict, msg)
            .exit(),
    };
    if let Err(msg) = logging::init(&config.log.level, config.log.format) {
        eprintln!("tcpfwd: error: {msg}");
        return ExitCode::from(EXIT_USAGE);
    }

    // Before the runtime starts threads: this clears the LISTEN_* variables.
    let sockets = match activation::take_from_env() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("tcpfwd: error: {e}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    if matches!(cli.command, Some(Command::Check(_))) {
        return match app::check(config, sockets) {
            Ok(lines) => {
                for l in lines {
                    println!("{l}");
                }
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("tcpfwd: error: {e:#}");
                ExitCode::from(EXIT_USAGE)
            }
        };
    }
    let systemd = app::FromSystemd {
        sockets,
        notifier: std::sync::Arc::new(notify::Notifier::from_env()),
    };

    // The main thread's event loop runs start-up, signals, ACME and reloads,
    // and is the first of the workers that serve connections (net::server
    // starts the others, each with an event loop of its own).
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("tcpfwd: error: cannot start the async runtime: {e}");
            return ExitCode::from(EXIT_FAILURE);
        }
    };
    let result = rt.block_on(async {
        let signals = shutdown::Signals::install()?;
        app::run_with(config, cli_layer, systemd, signals.recv()).await
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tcpfwd: error: {e:#}");
            if e.chain()
                .any(|c| c.is::<tls::CertError>() || c.is::<activation::ActivationError>())
            {
                ExitCode::from(EXIT_USAGE)
            } else {
                ExitCode::from(EXIT_FAILURE)
            }
        }
    }
}

/// `tcpfwd status`: asks the running instance and prints its answer.
fn status(a: &StatusArgs) -> ExitCode {
    let from_file = match (&a.control, &a.config) {
        (None, Some(path)) => match file::load(path) {
            Ok(l) => l.control,
            Err(msg) => {
                eprintln!("tcpfwd: error: {msg}");
                return ExitCode::from(EXIT_USAGE);
            }
        },
        _ => None,
    };
    let path = a
        .control
        .clone()
        .or(from_file)
        .unwrap_or_else(layer::default_control_path);
    match control::query(&path) {
        Ok(report) if a.json => match serde_json::to_string_pretty(&report) {
            Ok(text) => {
                println!("{text}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("tcpfwd: error: {e}");
                ExitCode::from(EXIT_FAILURE)
            }
        },
        Ok(report) => {
            print!("{}", control::render(&report));
            ExitCode::SUCCESS
        }
        Err(msg) => {
            eprintln!("tcpfwd: error: {msg}");
            ExitCode::from(EXIT_FAILURE)
        }
    }
}

/// `tcpfwd client-cert ...`: the family CA's commands.
fn client_cert(cmd: &ClientCertCommand) -> anyhow::Result<()> {
    let state = |a: &StateArgs| a.state_dir.clone().unwrap_or_else(layer::default_state_dir);
    match cmd {
        ClientCertCommand::New(a) => {
            let format = if a.modern {
                clientca::P12Format::Modern
            } else {
                clientca::P12Format::Legacy
            };
            let out = a.out_dir.clone().unwrap_or_else(|| ".".into());
            let delivery = clientca::Delivery {
                mobileconfig: a.mobileconfig,
                serve: a.serve.map(|at| (at, a.serve_for)),
            };
            clientca::cmd_new(
                &state(&a.state),
                &a.name,
                a.days,
                format,
                &out,
                delivery,
                a.replace,
            )
        }
        ClientCertCommand::Serve(a) => {
            let out = a.out_dir.clone().unwrap_or_else(|| ".".into());
            let delivery = clientca::Delivery {
                mobileconfig: a.mobileconfig,
                serve: Some((a.at, a.serve_for)),
            };
            clientca::cmd_serve(&a.name, &out, delivery)
        }
        ClientCertCommand::List(a) => clientca::cmd_list(&state(a)),
        ClientCertCommand::Revoke(a) => clientca::cmd_revoke(&state(&a.state), &a.name),
    }
}
