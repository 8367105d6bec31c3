//! The store conformance suite against PostgreSQL, each check in a schema of its own (see
//! `common/postgres.rs` for the database it uses and when it skips).

mod common;

use common::postgres::Schema;
use phasm::store::conformance;

#[tokio::test]
async fn postgres_passes_the_conformance_suite() {
    let schemas = std::sync::Mutex::new(Vec::new());
    match Schema::fresh("reachable").await {
        None => return,
        Some(schema) => schema.drop_schema().await,
    }
    conformance::run_all(|check| {
        let schemas = &schemas;
        async move {
            let schema = Schema::fresh(check).await.expect("PostgreSQL went away");
            let store = schema.store().await;
            schemas.lock().unwrap().push(schema);
            store
        }
    })
    .await;
    let schemas = std::mem::take(&mut *schemas.lock().unwrap());
    for schema in schemas {
        schema.drop_schema().await;
    }
}
