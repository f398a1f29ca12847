pub mod client;
pub mod coordinator;
pub mod doctor;
pub mod infer;
pub mod quantize;
pub mod run;
pub mod student;
pub mod worker;
