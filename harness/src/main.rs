//! `wsgate-harness`: validation scenarios against real `wsgate` processes and a load
//! generator. They arrive with the gateway (`wsgate serve`); until then this binary only says so.

fn main() -> std::process::ExitCode {
    eprintln!("wsgate-harness: scenarios arrive with `wsgate serve`; nothing to run yet");
    std::process::ExitCode::from(2)
}
