//! Everything that touches QEMU: argv and spawning ([`launch`]), what `ACCEL=auto` means here
//! ([`accel`]), the QMP client ([`qmp`]), the serial console ([`console`]), per-run disk
//! overlays ([`image`]), the running machine with its shutdown ladder ([`machine`]), and saving
//! and loading device state for templates and clones ([`snapshot`]).

pub mod accel;
pub mod console;
pub mod image;
pub mod launch;
pub mod machine;
pub mod qmp;
pub mod snapshot;
