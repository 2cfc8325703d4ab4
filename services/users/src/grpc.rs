//! `user.UserService` over gRPC (tonic), on the same port as REST: the
//! same profiles, rights and validation, with gRPC statuses for errors
//! (NOT_FOUND, INVALID_ARGUMENT, UNAUTHENTICATED, PERMISSION_DENIED,
//! ALREADY_EXISTS, UNAVAILABLE). The bearer token comes in the
//! `authorization` metadata. `grpc.health.v1` and server reflection
//! (v1 and v1alpha) are served beside it.

use axum::http::{Method, StatusCode};
use bazaar_chassis::auth::AuthUser;
use bazaar_chassis::{Problem, id};
use bazaar_contracts::grpc::user::user_service_server::{UserService, UserServiceServer};
use bazaar_contracts::grpc::user::{
    CreateUserRequest, DeleteUserRequest, DeleteUserResponse, GetUserRequest, UpdateUserRequest,
    User,
};
use bazaar_contracts::{Profile, Register};
use bazaar_mesh::CallError;
use tonic::{Request, Response, Status};

use crate::domain::{Change, PatchBody};
use crate::http::{AppState, allowed};
use crate::store;

/// The gRPC services as an axum router: `UserService`, health, reflection.
pub async fn router(state: AppState) -> anyhow::Result<axum::Router> {
    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<UserServiceServer<Users>>().await;
    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(bazaar_contracts::grpc::DESCRIPTORS)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(bazaar_contracts::grpc::DESCRIPTORS)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()?;
    Ok(
        tonic::service::Routes::new(UserServiceServer::new(Users(state)))
            .add_service(health_service)
            .add_service(reflection_v1)
            .add_service(reflection_v1alpha)
            .into_axum_router(),
    )
}

pub struct Users(AppState);

/// A problem as a gRPC status: its detail, never a cause.
fn status(p: &Problem) -> Status {
    let code = match p.status {
        400 | 413 | 422 => tonic::Code::InvalidArgument,
        401 => tonic::Code::Unauthenticated,
        403 => tonic::Code::PermissionDenied,
        404 => tonic::Code::NotFound,
        409 => tonic::Code::AlreadyExists,
        429 => tonic::Code::ResourceExhausted,
        503 | 502 => tonic::Code::Unavailable,
        504 => tonic::Code::DeadlineExceeded,
        _ => tonic::Code::Internal,
    };
    Status::new(code, p.detail.clone())
}

fn internal(e: sqlx::Error) -> Status {
    status(&Problem::internal(&e))
}

fn call_failed(e: &CallError) -> Status {
    status(&Problem::from_call(e))
}

fn to_user(p: Profile) -> User {
    User {
        id: p.id,
        name: p.name,
        email: p.email,
        phone: p.phone.unwrap_or_default(),
        address: p.address.unwrap_or_default(),
        created_at: p.created_at,
        updated_at: p.updated_at,
    }
}

/// An empty proto3 string is an unset field.
fn set(s: String) -> Option<String> {
    (!s.is_empty()).then_some(s)
}

impl Users {
    /// The caller, from the bearer token in the metadata.
    async fn caller<T>(&self, req: &Request<T>) -> Result<AuthUser, Status> {
        let headers = req.metadata().clone().into_headers();
        AuthUser::from_headers(&self.0.verifier, &headers)
            .await
            .map_err(|p| status(&p))
    }

    /// A checked id the caller may act on.
    fn target(caller: &AuthUser, raw: &str) -> Result<String, Status> {
        let id = id::parse("id", raw).map_err(|p| status(&p))?;
        allowed(caller, &id).map_err(|p| status(&p))?;
        Ok(id)
    }
}

#[tonic::async_trait]
impl UserService for Users {
    async fn get_user(&self, req: Request<GetUserRequest>) -> Result<Response<User>, Status> {
        let caller = self.caller(&req).await?;
        let id = Self::target(&caller, &req.get_ref().id)?;
        let p = store::get(&self.0.db.read, &id).await.map_err(internal)?;
        p.map(|p| Response::new(to_user(p)))
            .ok_or_else(|| Status::not_found("no such user"))
    }

    async fn create_user(&self, req: Request<CreateUserRequest>) -> Result<Response<User>, Status> {
        let caller = self.caller(&req).await?;
        if !caller.is_admin() {
            return Err(Status::permission_denied("admin role required"));
        }
        let r = req.into_inner();
        // The profile's own fields are checked before the account is made.
        let change = Change::try_from(PatchBody {
            name: Some(r.name.clone()),
            phone: Some(set(r.phone)),
            address: Some(set(r.address)),
        })
        .map_err(|p| status(&p))?;
        let reply = self
            .0
            .calls
            .request(Method::POST, "auth", &["auth", "register"])
            .json(&Register {
                email: r.email,
                password: r.password,
                name: r.name,
            })
            .send()
            .await
            .map_err(|e| call_failed(&e))?;
        if reply.status != StatusCode::CREATED {
            // auth's problem (409 taken, 422 invalid) says why, in its words.
            let problem: serde_json::Value =
                serde_json::from_slice(&reply.body).unwrap_or_default();
            let detail = problem["detail"]
                .as_str()
                .unwrap_or("the account was refused");
            let p = Problem::new(reply.status, "account", detail);
            return Err(match reply.status.as_u16() {
                409 | 422 | 400 => status(&p),
                _ => call_failed(&reply.unexpected()),
            });
        }
        let account: bazaar_contracts::User = reply.json().map_err(|e| call_failed(&e))?;
        let profile = Profile {
            id: account.id,
            email: account.email,
            name: change.name.unwrap_or(account.name),
            phone: change.phone.flatten(),
            address: change.address.flatten(),
            updated_at: account.created_at.clone(),
            created_at: account.created_at,
        };
        let p = self
            .0
            .outbox
            .committing(async {
                let mut tx = self.0.db.write.begin().await?;
                let p = store::create(&mut tx, &profile).await?;
                tx.commit().await?;
                Ok::<_, sqlx::Error>(p)
            })
            .await
            .map_err(internal)?;
        Ok(Response::new(to_user(p)))
    }

    async fn update_user(&self, req: Request<UpdateUserRequest>) -> Result<Response<User>, Status> {
        let caller = self.caller(&req).await?;
        let r = req.into_inner();
        let id = Self::target(&caller, &r.id)?;
        // An empty phone or address clears it.
        let change = Change::try_from(PatchBody {
            name: r.name,
            phone: r.phone.map(set),
            address: r.address.map(set),
        })
        .map_err(|p| status(&p))?;
        let p = self
            .0
            .outbox
            .committing(store::update(&self.0.db.write, &id, &change))
            .await
            .map_err(internal)?;
        p.map(|p| Response::new(to_user(p)))
            .ok_or_else(|| Status::not_found("no such user"))
    }

    async fn delete_user(
        &self,
        req: Request<DeleteUserRequest>,
    ) -> Result<Response<DeleteUserResponse>, Status> {
        let caller = self.caller(&req).await?;
        let id = Self::target(&caller, &req.get_ref().id)?;
        match self
            .0
            .outbox
            .committing(store::delete(&self.0.db.write, &id))
            .await
            .map_err(internal)?
        {
            Some(_) => Ok(Response::new(DeleteUserResponse { success: true })),
            None => Err(Status::not_found("no such user")),
        }
    }
}
