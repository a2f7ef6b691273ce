//! Presence and read state over the service API (docs/protocol.md, "Presence and read
//! state"): who is present in an org, and a user's unread counts.

use axum::extract::{Path, State};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{json, Value};

use crate::app::AppState;
use crate::channel::{Channel, ChannelKind};
use crate::http::error::ApiError;
use crate::http::extract::ServiceKey;
use crate::ids::{OrgId, UserId};
use crate::membership::Membership;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/api/v1/orgs/{org_id}/presence", get(presence))
        .route("/api/v1/users/{user_id}/unread", get(unread))
}

fn unavailable(what: &str, err: impl std::fmt::Display) -> ApiError {
    tracing::warn!(error = %err, "{what} unavailable");
    ApiError::Unavailable(format!("{what} cannot be read now; retry shortly"))
}

/// `200 {"users":[{"user_id","connections"}]}`, ordered by user id.
async fn presence(
    State(state): State<AppState>,
    _key: ServiceKey,
    Path(org_id): Path<String>,
) -> Result<Response, ApiError> {
    let org_id = OrgId::parse(&org_id)?;
    let users = state
        .presence
        .users(org_id.as_str())
        .await
        .map_err(|err| unavailable("presence", err))?;
    let users: Vec<Value> = users
        .into_iter()
        .map(|(user_id, connections)| json!({"user_id": user_id, "connections": connections}))
        .collect();
    Ok(Json(json!({"users": users})).into_response())
}

/// `200 {"channels":[{"channel","offset","read_offset","unread"}]}` for the user's
/// notifications and every org they belong to: from the membership table with
/// `database` membership; with `claims` or `webhook` (which herald cannot list), the
/// orgs the user has a read position in (with `webhook`, those it still grants).
async fn unread(
    State(state): State<AppState>,
    _key: ServiceKey,
    Path(user_id): Path<String>,
) -> Result<Response, ApiError> {
    let user_id = UserId::parse(&user_id)?;
    let user = user_id.as_str();
    let reads = state
        .store
        .read_positions(user)
        .await
        .map_err(|err| unavailable("read state", err))?;
    let orgs: Vec<String> = match &*state.membership {
        Membership::Database(store) => store
            .orgs_of(user)
            .await
            .map_err(|err| unavailable("membership", err))?,
        Membership::Claims | Membership::Webhook(_) => {
            let mut orgs = Vec::new();
            for read in &reads {
                if let Ok(channel) = Channel::parse(&read.channel) {
                    if channel.kind() == ChannelKind::Org
                        && state.membership.is_member_by_id(channel.id(), user).await
                    {
                        orgs.push(channel.id().to_owned());
                    }
                }
            }
            orgs
        }
    };
    let mut channels = vec![Channel::new(ChannelKind::Notifications, user)?];
    for org in orgs {
        channels.push(Channel::new(ChannelKind::Org, &org)?);
    }
    let mut out = Vec::with_capacity(channels.len());
    for channel in channels {
        let position = state
            .broker
            .position(&channel)
            .await
            .map_err(|err| unavailable("the channel's offset", err))?;
        let read_offset = reads
            .iter()
            .find(|read| read.channel == channel.name() && read.epoch == *position.epoch)
            .map_or(0, |read| read.offset.min(position.offset));
        out.push(json!({
            "channel": channel.name(),
            "offset": position.offset,
            "read_offset": read_offset,
            "unread": position.offset.saturating_sub(read_offset),
        }));
    }
    Ok(Json(json!({"channels": out})).into_response())
}
