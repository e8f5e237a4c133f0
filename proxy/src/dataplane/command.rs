//! Running the tools the backends drive (nft, iptables-restore, …): one place that spawns a
//! command line, feeds it input, and turns failures into errors naming the command.
use std::io::Write as _;
use std::process::{Command, Output, Stdio};

use super::DataplaneError;

/// Runs `argv`, feeding `stdin` if given; returns the tool's output whatever its exit status.
pub(crate) fn output(argv: &[String], stdin: Option<&[u8]>) -> Result<Output, DataplaneError> {
    let (prog, args) = argv
        .split_first()
        .ok_or_else(|| DataplaneError::Other("empty command".to_string()))?;
    let what = argv.join(" ");
    let mut child = Command::new(prog)
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| DataplaneError::Io {
            what: format!("running {what}"),
            source,
        })?;
    // The tools read all of their input before they answer, so writing first cannot deadlock.
    // If one exits early (EPIPE), its stderr says why: that is reported rather than the pipe
    // error.
    let write_error = match (stdin, child.stdin.take()) {
        (Some(data), Some(mut pipe)) => pipe.write_all(data).err(),
        _ => None,
    };
    // The pipe was dropped above, so the tool has seen end of input.
    let out = child
        .wait_with_output()
        .map_err(|source| DataplaneError::Io {
            what: format!("waiting for {what}"),
            source,
        })?;
    if let (Some(source), true) = (write_error, out.status.success()) {
        return Err(DataplaneError::Io {
            what: format!("writing to {what}"),
            source,
        });
    }
    Ok(out)
}

/// Runs `argv`, feeding `stdin`; returns stdout, or the tool's stderr as the error.
pub(crate) fn run(argv: &[String], stdin: Option<&[u8]>) -> Result<String, DataplaneError> {
    let out = output(argv, stdin)?;
    if !out.status.success() {
        return Err(DataplaneError::Tool {
            tool: argv.join(" "),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn argv(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn stdout_on_success_stderr_on_failure() {
        assert_eq!(run(&argv(&["cat"]), Some(b"in\n")).unwrap(), "in\n");
        match run(&argv(&["sh", "-c", "echo bad >&2; exit 3"]), None) {
            Err(DataplaneError::Tool { tool, stderr }) => {
                assert_eq!(tool, "sh -c echo bad >&2; exit 3");
                assert_eq!(stderr, "bad");
            }
            other => panic!("{other:?}"),
        }
        let out = output(&argv(&["sh", "-c", "exit 3"]), None).unwrap();
        assert_eq!(out.status.code(), Some(3));
        assert!(matches!(
            run(&argv(&["/nonexistent/tool"]), None),
            Err(DataplaneError::Io { .. })
        ));
        assert!(matches!(run(&[], None), Err(DataplaneError::Other(_))));
    }
}
