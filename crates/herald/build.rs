//! Rebuilds the crate when a migration is added or changed: `sqlx::migrate!` embeds the
//! `migrations/` directories at compile time, and cargo does not otherwise know to look
//! there, so an incremental build would ship without a new migration.

fn main() {
    println!("cargo:rerun-if-changed=migrations");
}
