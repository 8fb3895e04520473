//! `GET /v1/models` and `GET /v1/models/{model}`.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::response::{IntoResponse, Response};
use axum::Json;

use super::error::ApiError;
use super::tool_calls::ToolFamily;
use super::openai::{ModelCard, ModelDetails, ModelList};
use super::AppState;

fn card(state: &AppState) -> ModelCard {
    ModelCard {
        id: state.served_name.clone(),
        object: "model",
        created: state.started_at,
        owned_by: "terse",
        context_length: state.engine.get().map(|e| e.context_length()),
        terse: state.engine.get().map(|e| {
            let info = e.model_info();
            ModelDetails {
                arch: info.arch.clone(),
                format: info.format.clone(),
                dtype: info.dtype.clone(),
                weight_bytes: info.weight_bytes,
                sparse_fraction: info.sparse_fraction,
                device: info.device.clone(),
                reasoning: e.reasoning_summary().clone(),
                tool_calls: ToolFamily::of_template(e.tokenizer().chat_template_source()).map_or("none", |f| f.name()),
            }
        }),
    }
}

pub async fn list(State(state): State<Arc<AppState>>) -> Json<ModelList> {
    Json(ModelList {
        object: "list",
        data: vec![card(&state)],
    })
}

pub async fn retrieve(State(state): State<Arc<AppState>>, Path(model): Path<String>) -> Response {
    if model == state.served_name {
        Json(card(&state)).into_response()
    } else {
        ApiError::ModelNotFound(model).into_response()
    }
}
