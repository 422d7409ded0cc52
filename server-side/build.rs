//! Embeds the web console's built files (`console/dist`, made by `npm run build` in
//! `console/`) into the binary: writes `$OUT_DIR/console_assets.rs`, a table of
//! (path, content type, bytes) with one `include_bytes!` per file. Without a `dist` the table
//! is empty and `/` says how to build the console, so a developer who never touches the front
//! end builds the server without node.

use std::path::{Path, PathBuf};

fn content_type(path: &Path) -> &'static str {
    match path.extension().and_then(|e| e.to_str()).unwrap_or("") {
        "html" => "text/html; charset=utf-8",
        "js" | "mjs" => "text/javascript; charset=utf-8",
        "css" => "text/css; charset=utf-8",
        "svg" => "image/svg+xml",
        "png" => "image/png",
        "ico" => "image/x-icon",
        "json" => "application/json",
        "woff2" => "font/woff2",
        "txt" => "text/plain; charset=utf-8",
        _ => "application/octet-stream",
    }
}

fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            walk(&path, out);
        } else {
            out.push(path);
        }
    }
}

fn main() {
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap());
    let dist = manifest.join("console/dist");
    // A path that does not exist would rerun this script (and rebuild the crate) on every
    // build; without a dist, watch the console's directory, which changes when one is made.
    if dist.is_dir() {
        println!("cargo:rerun-if-changed=console/dist");
    } else {
        println!("cargo:rerun-if-changed=console");
    }
    println!("cargo:rerun-if-changed=build.rs");
    let mut files = Vec::new();
    walk(&dist, &mut files);
    files.sort();
    let mut table = String::from("&[\n");
    for file in &files {
        let rel = file.strip_prefix(&dist).unwrap();
        let url = format!("/{}", rel.to_string_lossy().replace('\\', "/"));
        table.push_str(&format!(
            "    ({url:?}, {:?}, include_bytes!({:?})),\n",
            content_type(file),
            file.display().to_string()
        ));
    }
    table.push(']');
    let out = PathBuf::from(std::env::var("OUT_DIR").unwrap()).join("console_assets.rs");
    std::fs::write(out, table).unwrap();
}
