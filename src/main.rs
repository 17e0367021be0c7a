fn main() -> std::process::ExitCode {
    pullgate::cli::main()
}
