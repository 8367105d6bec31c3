//! The API's OpenAPI 3.1 description, served at `GET /api/openapi.json`. Each route's part
//! is generated from its handler's `#[utoipa::path]` annotation, and the router registers a
//! route and its description in one call (`utoipa_axum::routes!`), so the document lists what
//! the server answers. This module holds what is shared: the document's head, the bearer
//! security scheme, and the schemas of bodies the handlers read by hand.

use std::sync::Arc;

use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::Extension;
use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityScheme};
use utoipa::{Modify, OpenApi, ToSchema};

/// The document's head: title, description, the security scheme, tags, and shared schemas.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "phasm",
        description = "Durable finite-state-machine workflows: start instances of machines, \
                       follow and control them, send them events. Every error is a JSON object \
                       `{\"error\": MESSAGE}` saying what was wrong and what to do. When the \
                       server runs with `--token`, every call under `/api` (but `/api/waits`) \
                       needs `Authorization: Bearer TOKEN`."
    ),
    modifiers(&BearerSecurity),
    security(("bearer" = [])),
    components(schemas(ErrorBody, StartBody, BatchBody, EventBody)),
    tags(
        (name = "machines", description = "The machines the server runs, and starting instances of them"),
        (name = "instances", description = "Finding, reading and controlling instances"),
        (name = "events", description = "Events from outside for waiting instances"),
        (name = "operations", description = "Workers, queues, schedules, health and metrics"),
    )
)]
pub(super) struct ApiDoc;

/// Adds the `bearer` scheme the document's `security` names.
struct BearerSecurity;

impl Modify for BearerSecurity {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(Http::new(HttpAuthScheme::Bearer)),
        );
    }
}

/// Every error answer.
#[derive(ToSchema, serde::Serialize)]
pub(super) struct ErrorBody {
    /// What was wrong, where, and what to do.
    pub(super) error: String,
}

/// The body of `POST /api/machines/{machine}/instances` (empty: an instance with an empty
/// context and a generated name).
#[derive(ToSchema, serde::Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct StartBody {
    /// The instance's name (unique; starting again with it changes nothing).
    pub(super) name: Option<String>,
    /// The input context: values of the machine's `context_types` are checked and converted.
    pub(super) context: Option<serde_json::Map<String, serde_json::Value>>,
    /// The version of the machine to start on (default: the latest deployed); one that is not
    /// stored is refused (400), naming those that are.
    #[schema(value_type = Option<u32>, minimum = 1)]
    pub(super) version: Option<std::num::NonZeroU32>,
}

/// The body of `POST /api/machines/{machine}/instances/batch`.
#[derive(ToSchema)]
#[allow(
    dead_code,
    reason = "the schema of the body `server::batch` reads item by item, counting and bounding \
              each item as it goes, which a derived Deserialize of this type could not"
)]
pub(super) struct BatchBody {
    /// One item per instance, at most 10,000; all start, or none. An item is its input
    /// context, or `{"name": NAME, "context": {...}}` to name the instance (an object with a
    /// `context` object and nothing else but a `name`). A name that exists starts nothing.
    contexts: Vec<serde_json::Map<String, serde_json::Value>>,
    /// An idempotency key: unnamed items are named `MACHINE-KEY-N`, so the same batch sent
    /// again (its answer lost) starts nothing twice and answers with the same names.
    key: Option<String>,
    /// The version of the machine to start on (default: the latest deployed).
    version: Option<u32>,
}

/// The body of the event endpoints.
#[derive(ToSchema, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct EventBody {
    /// The event (one a waiting state of the instance's machine accepts).
    pub(super) event: String,
    /// Keys merged into the waiting branch's context.
    pub(super) data: Option<serde_json::Map<String, serde_json::Value>>,
    /// An id: the same id sent again is accepted once.
    pub(super) id: Option<String>,
}

/// Adds the token's answer (401) to every operation of `openapi`: given the document of the
/// routes behind `authorize` (before the unguarded ones are merged in), so no handler repeats
/// it and no list of guarded paths is kept beside the router.
pub(super) fn add_token_errors(openapi: &mut utoipa::openapi::OpenApi) {
    use utoipa::openapi::{schema::Ref, ContentBuilder, RefOr, ResponseBuilder};
    let unauthorized = ResponseBuilder::new()
        .description("A token is required and was missing or wrong")
        .content(
            "application/json",
            ContentBuilder::new()
                .schema(Some(Ref::from_schema_name("ErrorBody")))
                .build(),
        )
        .build();
    for item in openapi.paths.paths.values_mut() {
        for operation in [
            &mut item.get,
            &mut item.post,
            &mut item.put,
            &mut item.delete,
        ]
        .into_iter()
        .flatten()
        {
            operation
                .responses
                .responses
                .insert("401".into(), RefOr::T(unauthorized.clone()));
        }
    }
}

/// The generated document, as JSON text, for [`openapi_json`].
#[derive(Clone)]
pub(super) struct Document(pub(super) Arc<str>);

/// This API's OpenAPI 3.1 document.
#[utoipa::path(
    get,
    path = "/api/openapi.json",
    tag = "operations",
    responses(
        (status = 200, description = "The OpenAPI 3.1 document of this API", body = serde_json::Value),
    )
)]
pub(super) async fn openapi_json(Extension(doc): Extension<Document>) -> Response {
    (
        [(header::CONTENT_TYPE, "application/json")],
        doc.0.to_string(),
    )
        .into_response()
}
