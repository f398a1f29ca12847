pub mod coordinator;
pub mod doctor;
pub mod infer;
pub mod student;
pub mod stub;
