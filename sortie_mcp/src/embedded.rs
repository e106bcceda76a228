//! The embedded default (SPEC §9): with no `DATABASE_URL`, a private PostgreSQL cluster under
//! the user's data directory, created with the system's `initdb` on first use, listening only
//! on a Unix socket in that directory, started on demand and left running for the next process.
//!
//! PostgreSQL refuses to run as root. When we are root, the server runs as the `postgres`
//! user on directories that user owns (under `/var/lib/sortie`, since `postgres` cannot
//! enter `/root`). The same code starts the throwaway clusters of the test suite.

use std::fs::{self, File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use anyhow::{bail, Context, Result};

use crate::config::Env;

const SETUP_HINT: &str =
    "run scripts/setup to install PostgreSQL 15, pgvector and the sortie extension";
const SERVER_USER: &str = "postgres";

/// One cluster: where its files and its socket live.
#[derive(Debug, Clone)]
pub struct Cluster {
    pub root: PathBuf,
    pub bin_dir: PathBuf,
    /// Extra `-c name=value` settings for the server.
    pub settings: Vec<(String, String)>,
}

#[allow(unsafe_code)] // libc calls; see the SAFETY comment inside
pub fn running_as_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// The embedded default's home: `SORTIE_DATA_DIR`, else `$XDG_DATA_HOME/sortie`,
/// `~/.local/share/sortie`, or for root `/var/lib/sortie`.
pub fn default_root(env: &Env) -> Result<PathBuf> {
    if let Some(dir) = &env.data_dir {
        return Ok(dir.clone());
    }
    if running_as_root() {
        return Ok(PathBuf::from("/var/lib/sortie"));
    }
    if let Some(xdg) = &env.xdg_data_home {
        return Ok(xdg.join("sortie"));
    }
    let home = env
        .home
        .as_ref()
        .context("neither XDG_DATA_HOME nor HOME is set")?;
    Ok(home.join(".local/share/sortie"))
}

/// The PostgreSQL server binaries of this process: [`bin_dir`] with its `SORTIE_PG_BIN`.
pub fn find_bin_dir() -> Result<PathBuf> {
    bin_dir(Env::get().pg_bin.as_deref())
}

/// The PostgreSQL server binaries: `pg_bin` (`SORTIE_PG_BIN`), else `pg_config --bindir`, else
/// Debian's PostgreSQL 15 location.
pub fn bin_dir(pg_bin: Option<&Path>) -> Result<PathBuf> {
    let has_server = |dir: &Path| dir.join("initdb").is_file() && dir.join("pg_ctl").is_file();
    // A directory named on purpose that is wrong is a start-up error, not a silent fallback.
    if let Some(dir) = pg_bin {
        let dir = dir.to_path_buf();
        if !has_server(&dir) {
            bail!(
                "SORTIE_PG_BIN={:?} is invalid: expected a directory with initdb and pg_ctl, such as /usr/lib/postgresql/15/bin",
                dir.display().to_string()
            );
        }
        return Ok(dir);
    }
    let candidates = std::iter::empty()
        .chain(
            Command::new("pg_config")
                .arg("--bindir")
                .output()
                .ok()
                .filter(|o| o.status.success())
                .map(|o| PathBuf::from(String::from_utf8_lossy(&o.stdout).trim())),
        )
        .chain([PathBuf::from("/usr/lib/postgresql/15/bin")]);
    for dir in candidates {
        if has_server(&dir) {
            return Ok(dir);
        }
    }
    bail!("PostgreSQL server binaries (initdb, pg_ctl) not found: {SETUP_HINT}")
}

impl Cluster {
    pub fn new(root: PathBuf, bin_dir: PathBuf) -> Self {
        Self {
            root,
            bin_dir,
            settings: Vec::new(),
        }
    }

    pub fn data_dir(&self) -> PathBuf {
        self.root.join("pgdata")
    }

    pub fn socket_dir(&self) -> PathBuf {
        self.root.join("run")
    }

    /// A libpq/tokio-postgres connection string for `database`.
    pub fn connection_string(&self, database: &str) -> String {
        format!(
            "host={} user={SERVER_USER} dbname={database}",
            self.socket_dir().display()
        )
    }

    /// Creates the cluster if needed and starts it if it is not running. Concurrent callers
    /// serialise on a lock file, so two processes starting at once cannot both run initdb.
    pub fn ensure_running(&self) -> Result<()> {
        fs::create_dir_all(&self.root)
            .with_context(|| format!("creating {}", self.root.display()))?;
        let _lock = FileLock::acquire(&self.root.join("cluster.lock"))?;
        if !self.data_dir().join("PG_VERSION").is_file() {
            self.init()?;
        }
        if !self.is_running() {
            self.start()?;
        }
        Ok(())
    }

    fn init(&self) -> Result<()> {
        let data = self.data_dir();
        if data.exists() {
            // A half-made data directory from an interrupted initdb: start over.
            fs::remove_dir_all(&data)
                .with_context(|| format!("removing incomplete {}", data.display()))?;
        }
        self.make_server_dir(&data, 0o700)?;
        let output = self
            .server_command("initdb")
            .args(["-D"])
            .arg(&data)
            .args([
                "-U",
                SERVER_USER,
                "--auth=trust",
                "--encoding=UTF8",
                "--no-sync",
                "--locale=C.UTF-8",
            ])
            .output()
            .context("running initdb")?;
        check(&output, "initdb")
    }

    fn is_running(&self) -> bool {
        self.server_command("pg_ctl")
            .arg("status")
            .arg("-D")
            .arg(self.data_dir())
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false)
    }

    fn start(&self) -> Result<()> {
        let socket = self.socket_dir();
        self.make_server_dir(&socket, 0o700)?;
        let mut options = format!(
            "-k {} -c listen_addresses='' -c unix_socket_permissions=0700",
            socket.display()
        );
        for (name, value) in &self.settings {
            options.push_str(&format!(" -c {name}={value}"));
        }
        let log = self.root.join("postgres.log");
        if running_as_root() {
            File::create(&log)?;
            chown_to_server_user(&log)?;
        }
        let output = self
            .server_command("pg_ctl")
            .arg("start")
            .arg("-w")
            .arg("-D")
            .arg(self.data_dir())
            .arg("-l")
            .arg(&log)
            .arg("-o")
            .arg(options)
            .output()
            .context("running pg_ctl start")?;
        check(&output, "pg_ctl start").with_context(|| format!("see {}", log.display()))
    }

    /// Stops the server at once (tests); `fast` waits for clients to be disconnected cleanly.
    pub fn stop(&self, mode: &str) -> Result<()> {
        let output = self
            .server_command("pg_ctl")
            .args(["stop", "-m", mode, "-D"])
            .arg(self.data_dir())
            .output()
            .context("running pg_ctl stop")?;
        check(&output, "pg_ctl stop")
    }

    /// A command for a server binary, run as the `postgres` user when we are root, and
    /// without RUST_BACKTRACE, which would make the server send whole backtraces to clients.
    pub fn server_command(&self, binary: &str) -> Command {
        let program = self.bin_dir.join(binary);
        let mut command = if running_as_root() {
            let mut c = Command::new("runuser");
            c.args(["-u", SERVER_USER, "--"]).arg(program);
            c
        } else {
            Command::new(program)
        };
        command
            .env_remove("RUST_BACKTRACE")
            .env_remove("RUST_LIB_BACKTRACE");
        command.current_dir(&self.root);
        command
    }

    fn make_server_dir(&self, dir: &Path, mode: u32) -> Result<()> {
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        fs::set_permissions(dir, fs::Permissions::from_mode(mode))?;
        if running_as_root() {
            chown_to_server_user(dir)?;
            // The server user must be able to reach its directories.
            let mut parent = dir.parent();
            while let Some(p) = parent {
                if p == Path::new("/") {
                    break;
                }
                let meta = fs::metadata(p)?;
                if meta.permissions().mode() & 0o001 == 0 {
                    bail!(
                        "{} is not reachable by the {SERVER_USER} user; use a directory outside it",
                        p.display()
                    );
                }
                parent = p.parent();
            }
        }
        Ok(())
    }
}

fn chown_to_server_user(path: &Path) -> Result<()> {
    let status = Command::new("chown")
        .arg(format!("{SERVER_USER}:"))
        .arg(path)
        .status()
        .context("running chown")?;
    if !status.success() {
        bail!(
            "could not hand {} to the {SERVER_USER} user (does it exist? {SETUP_HINT})",
            path.display()
        );
    }
    Ok(())
}

fn check(output: &Output, what: &str) -> Result<()> {
    if output.status.success() {
        return Ok(());
    }
    bail!(
        "{what} failed ({}): {}{}",
        output.status,
        String::from_utf8_lossy(&output.stderr).trim(),
        String::from_utf8_lossy(&output.stdout).trim()
    )
}

/// An exclusive `flock` held until dropped.
struct FileLock(File);

impl FileLock {
    #[allow(unsafe_code)] // libc calls; see the SAFETY comment inside
    fn acquire(path: &Path) -> Result<Self> {
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)
            .with_context(|| format!("opening {}", path.display()))?;
        // SAFETY: the descriptor is owned by `file`, which outlives the call.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } != 0 {
            bail!(
                "locking {}: {}",
                path.display(),
                std::io::Error::last_os_error()
            );
        }
        Ok(Self(file))
    }
}

impl Drop for FileLock {
    #[allow(unsafe_code)] // libc calls; see the SAFETY comment inside
    fn drop(&mut self) {
        // SAFETY: as above; unlocking a held lock cannot corrupt anything.
        unsafe { libc::flock(self.0.as_raw_fd(), libc::LOCK_UN) };
    }
}
