//! The relay's own tags: `{% abort %}` (CleverTap's), and `{% __at %}` / `{% __var %}`, which `rewrite` adds.

use super::output;
use liquid_core::{Expression, Language, ParseTag, Renderable, Runtime, TagReflection, TagTokenIter};
use std::io::Write;

/// `{% abort %}`: CleverTap's "do not send for this profile". The relay reports the item as ignored.
#[derive(Clone, Copy, Debug, Default)]
pub(super) struct AbortTag;

impl TagReflection for AbortTag {
    fn tag(&self) -> &'static str {
        "abort"
    }
    fn description(&self) -> &'static str {
        "Stops the render: nothing is sent for this item, which is reported as ignored."
    }
}

impl ParseTag for AbortTag {
    fn parse(&self, mut arguments: TagTokenIter<'_>, _options: &Language) -> liquid_core::Result<Box<dyn Renderable>> {
        // CleverTap's form takes no argument; a reason string is accepted and ignored.
        while arguments.next().is_some() {}
        Ok(Box::new(Abort))
    }
    fn reflection(&self) -> &dyn TagReflection {
        self
    }
}

#[derive(Debug)]
struct Abort;

impl Renderable for Abort {
    fn render_to(&self, _writer: &mut dyn Write, _runtime: &dyn Runtime) -> liquid_core::Result<()> {
        output::set_abort();
        Err(liquid_core::Error::with_msg("abort"))
    }
}

/// `{% __at N %}`: placed before an output with filters by `document::rewrite`, so that a render error names where.
#[derive(Clone, Copy, Debug, Default)]
pub(super) struct AtTag;

impl TagReflection for AtTag {
    fn tag(&self) -> &'static str {
        "__at"
    }
    fn description(&self) -> &'static str {
        "Records where the next output is (added by the relay)."
    }
}

impl ParseTag for AtTag {
    fn parse(&self, mut arguments: TagTokenIter<'_>, _options: &Language) -> liquid_core::Result<Box<dyn Renderable>> {
        let at = arguments
            .expect_next("a position")?
            .as_str()
            .parse::<u32>()
            .map_err(|_| liquid_core::Error::with_msg("__at takes a number"))?;
        Ok(Box::new(At(at)))
    }
    fn reflection(&self) -> &dyn TagReflection {
        self
    }
}

#[derive(Debug)]
struct At(u32);

impl Renderable for At {
    fn render_to(&self, _writer: &mut dyn Write, _runtime: &dyn Runtime) -> liquid_core::Result<()> {
        output::set_position(self.0);
        Ok(())
    }
}

/// `{% __var N path %}`: `{{ path }}` for a plain path of global variables, read in place (see
/// `output::write_var`); liquid evaluates `path` when the fast read does not apply.
#[derive(Clone, Copy, Debug, Default)]
pub(super) struct VarTag;

impl TagReflection for VarTag {
    fn tag(&self) -> &'static str {
        "__var"
    }
    fn description(&self) -> &'static str {
        "Outputs a global variable, escaped for where it lands (added by the relay)."
    }
}

impl ParseTag for VarTag {
    fn parse(&self, mut arguments: TagTokenIter<'_>, _options: &Language) -> liquid_core::Result<Box<dyn Renderable>> {
        let at = arguments
            .expect_next("a position")?
            .as_str()
            .parse::<u32>()
            .map_err(|_| liquid_core::Error::with_msg("__var takes a number"))?;
        let token = arguments.expect_next("a variable")?;
        let path = token.as_str().split('.').map(str::to_owned).collect();
        let expression = token.expect_value().into_result()?;
        arguments.expect_nothing()?;
        Ok(Box::new(Var { at, path, expression }))
    }
    fn reflection(&self) -> &dyn TagReflection {
        self
    }
}

#[derive(Debug)]
struct Var {
    at: u32,
    path: Vec<String>,
    expression: Expression,
}

impl Renderable for Var {
    fn render_to(&self, writer: &mut dyn Write, runtime: &dyn Runtime) -> liquid_core::Result<()> {
        let written =
            output::write_var(&self.path, self.at).map_err(|e| liquid_core::Error::with_msg(format!("output: {e}")))?;
        if !written {
            let value = self.expression.evaluate(runtime)?;
            let text = output::escape_value(value.as_view(), self.at);
            writer.write_all(text.as_bytes()).map_err(|e| liquid_core::Error::with_msg(format!("output: {e}")))?;
        }
        Ok(())
    }
}
