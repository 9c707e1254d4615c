fn main() {
    eprintln!("xtask: see `cargo xtask help`");
}
