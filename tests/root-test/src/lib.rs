//! `#[root_test]` in place of `#[test]`: the test runs only where the root tier can
//! (`integration::root_tier()`: root and BTF; under `CI` their absence fails instead).

use proc_macro::TokenStream;
use quote::quote;
use syn::{parse_macro_input, ItemFn};

#[proc_macro_attribute]
pub fn root_test(attr: TokenStream, item: TokenStream) -> TokenStream {
    if !attr.is_empty() {
        return syn::Error::new(
            proc_macro2::Span::call_site(),
            "#[root_test] takes no arguments",
        )
        .to_compile_error()
        .into();
    }
    let ItemFn {
        attrs,
        vis,
        sig,
        block,
    } = parse_macro_input!(item as ItemFn);
    quote! {
        #[test]
        #(#attrs)*
        #vis #sig {
            if !::integration::root_tier() {
                return;
            }
            #block
        }
    }
    .into()
}
